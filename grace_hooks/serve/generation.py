"""Generation for the server: one request's tokens, streamed as text pieces.

- A request's whole generation runs in one worker thread that holds the model exclusively
  (:meth:`EditableModel.exclusive`), so it sees one stack of packs from its first token to its last:
  a pack added or removed meanwhile waits until it is done (a request sees all of a pack or none),
  and requests that have not started by then wait for that change (:mod:`grace_hooks.serve.turns`).
  Requests therefore take turns on the model; on a CPU torch already uses the cores within one.
- Streaming and non-streaming answers are the same text pieces (non-streaming joins them), so the
  two give the same text by construction.
- Stop strings are looked for in the decoded text; text that could be the start of a stop string
  is held back until a later token shows it is not, and nothing from a stop string on is sent.
- A consumer that stops reading, or a set ``cancel`` event (a streaming client that went away,
  :func:`grace_hooks.serve.openai_routes.relay`), ends the generation at its next step, and one
  that has not started yet gives its turn back at once.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..eval.chat import end_of_turn_ids
from .errors import ApiError
from .turns import Turns

log = logging.getLogger(__name__)

_DONE = object()


@dataclass(frozen=True)
class Sampling:
    """How one request samples (OpenAI's meaning: temperature 0 is greedy decoding)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Outcome:
    """What a finished generation reports (OpenAI's usage and finish_reason)."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "length"


class _ToQueue(BaseStreamer):
    """Hands each new token of ``generate`` to the consumer (the first call is the prompt)."""

    def __init__(self, out: queue.Queue) -> None:
        self.out, self.prompt_seen = out, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.out.put(value.reshape(-1).tolist())

    def end(self) -> None:  # the worker signals the end itself, also after an error
        pass


class _Until(StoppingCriteria):
    """Stops generating once one of ``events`` is set (a stop string was written, the consumer
    left, or the request was cancelled)."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Pieces:
    """Decoded text so far, handed out in pieces that never include a stop string or what follows it."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = 0  # characters handed out

    def _text(self, ids: list[int]) -> tuple[str, bool]:
        """The text of ``ids`` cut before the first stop string, and whether one was found."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for s in self.stops if (i := text.find(s)) >= 0]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def step(self, ids: list[int]) -> tuple[str, bool]:
        """The next piece after a new token (may be empty), and whether a stop string ended the text."""
        text, stopped = self._text(ids)
        if not stopped and text.endswith("\ufffd"):  # a character split across tokens: wait for its rest
            return "", False
        end = len(text) if stopped else max(self.sent, len(text) - self.hold)
        piece, self.sent = text[self.sent:end], end
        return piece, stopped

    def rest(self, ids: list[int]) -> str:
        text, _ = self._text(ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """A request's own random stream when it gives a seed, leaving the process's stream as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def context_limit(config) -> int | None:
    """The longest sequence the model's positions allow, where its config says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Completion:
    """One request's generation, started at once in its own thread. Iterate for the text pieces;
    :attr:`outcome` is complete when the iteration ends."""

    def __init__(self, model, prompt_ids: list[int], sampling: Sampling, turns: Turns | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.model, self.sampling, self.turns = model, sampling, turns or Turns()
        # Set by whoever learns that the answer is no longer wanted (a streaming client that hung up);
        # unlike _stop it may be shared by the several prompts of one request.
        self.cancel = cancel or threading.Event()
        self.prompt_ids = list(prompt_ids)
        self.end_ids = set(end_of_turn_ids(model.tokenizer))
        self.outcome = Outcome(prompt_tokens=len(self.prompt_ids))
        self._tokens: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="grace-hooks-generate", daemon=True).start()

    def _config(self) -> GenerationConfig:
        s, tok = self.sampling, self.model.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0) if s.temperature > 0 \
            else dict(do_sample=False)
        return GenerationConfig(max_new_tokens=s.max_tokens, num_beams=1, eos_token_id=sorted(self.end_ids) or None,
                                pad_token_id=pad, **sampling)

    def _run(self) -> None:
        try:
            ids = torch.tensor([self.prompt_ids], device=self.model.device)
            with self.turns.generation(), self.model.exclusive(), torch.inference_mode(), \
                    _seeded(self.sampling.seed, self.model.device):
                if self.cancel.is_set():  # cancelled while it waited for its turn: give the turn back at once
                    return
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=self._config(),
                                    streamer=_ToQueue(self._tokens),
                                    stopping_criteria=StoppingCriteriaList([_Until(self._stop, self.cancel)]))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it in its thread
            log.exception("generation failed")
            self._tokens.put(exc)
        finally:
            self._tokens.put(_DONE)

    def __iter__(self) -> Iterator[str]:
        pieces = _Pieces(self.model.tokenizer, self.sampling.stop)
        ids: list[int] = []
        out = self.outcome
        try:
            done = False
            while not done and (item := self._tokens.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise ApiError(500, f"generation failed: {item}", "server_error")
                for token in item:
                    if token in self.end_ids:  # end of turn: the text held back for stop strings is all answer
                        out.finish_reason, done = "stop", True
                        break
                    ids.append(token)
                    out.completion_tokens += 1
                    piece, stopped = pieces.step(ids)
                    if piece:
                        yield piece
                    if stopped:
                        out.finish_reason, done = "stop", True
                        break
            tail = pieces.rest(ids)
            if tail:
                yield tail
        finally:
            self._stop.set()  # a stop string, the end, or a consumer that left: the worker stops at its next step

    def text(self) -> str:
        """The whole answer (what streaming sends, joined)."""
        return "".join(self)
