"""The OpenAI endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
answered with every loaded pack acting, streamed as server-sent events when asked."""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterable, Iterator

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from .errors import ApiError, error_body
from .generation import Completion, Sampling, context_limit
from .schemas import ChatRequest, CompletionRequest, _Generation

router = APIRouter()

# Options whose meaning this server cannot honour: refused (400) rather than silently dropped.
UNSUPPORTED_CHAT = ("logprobs", "top_logprobs", "tools", "functions")
UNSUPPORTED_COMPLETION = ("logprobs", "echo", "suffix", "best_of")


def _state(request: Request):
    return request.app.state.grace


def _sampling(state, body: _Generation, prompt_len: int, wanted: int | None, default: int) -> Sampling:
    """The request's sampling, its token budget checked against the server's cap and cut to the context left."""
    cap = state.config.max_tokens
    budget = wanted if wanted is not None else min(default, cap)
    if budget > cap:
        raise ApiError(400, f"max_tokens={budget} is over this server's limit of {cap} (grace-hooks serve --max-tokens)",
                       param="max_tokens")
    limit = context_limit(state.model.config)
    if limit is not None:
        if prompt_len >= limit:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this model reads at most {limit}", param="messages")
        budget = min(budget, limit - prompt_len)
    return Sampling(max_tokens=budget, temperature=body.temperature, top_p=body.top_p, stop=body.stops, seed=body.seed)


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` in the tokenizer's chat template, the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template (a base model, not a chat model); "
                            "use POST /v1/completions with plain text", param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a role the template does not accept
        raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _usage(outcomes: Iterable) -> dict[str, int]:
    outcomes = list(outcomes)
    prompt, completion = sum(o.prompt_tokens for o in outcomes), sum(o.completion_tokens for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _events(chunks: Iterator[dict]) -> Iterator[str]:
    """Server-sent events of ``chunks``, then ``[DONE]``; an error after the headers went out
    becomes an error event (the official client raises it)."""
    try:
        for chunk in chunks:
            yield _sse(chunk)
    except ApiError as exc:
        yield _sse(error_body(exc.status, exc.message, exc.kind))
    yield _sse("[DONE]")


async def relay(events: Iterator[str], cancel: threading.Event) -> AsyncIterator[str]:
    """``events``, each produced in a worker thread; when the stream ends early (the client hung up,
    and the server cancels the response) ``cancel`` is set, so the generation stops at its next step
    and frees the model. The worker thread is not waited for (it ends within a step): waiting would
    hold the cancellation, and so the model, until the next token."""
    try:
        while (event := await anyio.to_thread.run_sync(next, events, None, abandon_on_cancel=True)) is not None:
            yield event
    finally:
        cancel.set()


def _stream(chunks: Iterator[dict], cancel: threading.Event) -> StreamingResponse:
    return StreamingResponse(relay(_events(chunks), cancel), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.get("/v1/models")
def list_models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.started,
                                        "owned_by": "grace_hooks"}]}


@router.post("/v1/chat/completions")
def chat_completions(body: ChatRequest, request: Request):
    state = _state(request)
    state.check_model(body.model)
    body.refuse_unsupported(*UNSUPPORTED_CHAT)
    ids = chat_prompt(state.model.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
    sampling = _sampling(state, body, len(ids), body.token_budget, state.config.max_tokens)
    cancel = threading.Event()
    completion = Completion(state.model, ids, sampling, state.live.turns, cancel)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_id}
    if body.stream:
        return _stream(_chat_chunks(completion, head | {"object": "chat.completion.chunk"}, body.include_usage), cancel)
    text = completion.text()
    return head | {"object": "chat.completion", "usage": _usage([completion.outcome]), "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": completion.outcome.finish_reason,
         "logprobs": None}]}


def _chat_chunks(completion: Completion, head: dict, include_usage: bool) -> Iterator[dict]:
    def chunk(delta: dict, finish: str | None = None) -> dict:
        return head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    yield chunk({"role": "assistant", "content": ""})
    for piece in completion:
        yield chunk({"content": piece})
    yield chunk({}, completion.outcome.finish_reason)
    if include_usage:
        yield head | {"choices": [], "usage": _usage([completion.outcome])}


@router.post("/v1/completions")
def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    state.check_model(body.model)
    body.refuse_unsupported(*UNSUPPORTED_COMPLETION)
    if not body.prompts:
        raise ApiError(400, "prompt is an empty list: give a text, or a list of texts", param="prompt")
    tok = state.model.tokenizer
    encoded = [tok(p)["input_ids"] for p in body.prompts]
    if any(not ids for ids in encoded):
        raise ApiError(400, "a prompt has no tokens (an empty text, and the tokenizer adds no BOS): give some text",
                       param="prompt")
    sampling = [_sampling(state, body, len(ids), body.max_tokens, state.config.completion_tokens) for ids in encoded]
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_id}
    # One prompt after another, each started only when the one before has finished: every prompt
    # holds the model for its whole generation.
    runs = ((ids, s) for ids, s in zip(encoded, sampling))
    if body.stream:
        cancel = threading.Event()
        return _stream(_completion_chunks(state, runs, head, body.include_usage, cancel), cancel)
    choices, outcomes = [], []
    for i, (ids, s) in enumerate(runs):
        completion = Completion(state.model, ids, s, state.live.turns)
        text = completion.text()
        choices.append({"index": i, "text": text, "finish_reason": completion.outcome.finish_reason, "logprobs": None})
        outcomes.append(completion.outcome)
    return head | {"choices": choices, "usage": _usage(outcomes)}


def _completion_chunks(state, runs, head: dict, include_usage: bool, cancel: threading.Event) -> Iterator[dict]:
    def chunk(i: int, text: str, finish: str | None = None) -> dict:
        return head | {"choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}]}

    outcomes = []
    for i, (ids, s) in enumerate(runs):
        completion = Completion(state.model, ids, s, state.live.turns, cancel)
        for piece in completion:
            yield chunk(i, piece)
        yield chunk(i, "", completion.outcome.finish_reason)
        outcomes.append(completion.outcome)
    if include_usage:
        yield head | {"choices": [], "usage": _usage(outcomes)}
