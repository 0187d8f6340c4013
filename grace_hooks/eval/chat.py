"""Answers as a user of a chat model reads them: the question in the chat template, greedy decoding
to the answer's natural end, the new target looked for anywhere in it.

Teacher-forced scores and target-length decoding flatter editors ("The Mirage of Model Editing",
2025, WILD evaluation: the input in the model's chat format, generation to its natural stop, the
answer judged as a whole). Here:

- the input goes through the tokenizer's chat template as one user turn, when it has one
  (SmolLM2-Instruct and Gemma 3 do); otherwise the text is used as it is;
- greedy decoding runs to the natural stop: end of turn / EOS, the end of the first line, or the
  end of the first sentence (``.``, ``!`` or ``?`` before a space or the end), with a cap of
  ``max_new_tokens`` tokens. An abbreviation's full stop ("St. Louis") also ends a sentence here:
  the cut is plain and the same for the edited and the base model;
- an answer counts when it contains the new target as whole words, case ignored
  (:func:`~grace_hooks.eval.generation.mentions`): "Zorbatownownown" does not contain "Zorbatown";
- locality in the same style: the answer text to an unrelated question is identical to the base's.
"""
from __future__ import annotations

import re
from typing import Sequence

from .generation import greedy_batch, mentions
from ..tokens import chat_wrapping

CHAT_MAX_NEW_TOKENS = 48
# End-of-turn markers of common chat templates (data, not code: a new family adds its marker here).
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
STOP_STRINGS = ("\n", ". ", "! ", "? ")  # decoding may stop once one has been written (then cut below)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def question_form(tokenizer) -> str:
    """How :func:`chat_answers` asks with this tokenizer: "chat" (one user turn of its chat template)
    or "plain" (no template: the text itself, greedily continued). Reports name a figure "chat" only
    for the first."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def chat_input(tokenizer, text: str) -> tuple[str, bool]:
    """(model input, whether it holds its own special tokens): ``text`` as one user turn of the
    tokenizer's chat template with the assistant's turn opened, or ``text`` itself without a template."""
    if question_form(tokenizer) == "plain":
        return text, False
    wrapping = chat_wrapping(tokenizer)  # the same turn that edits are optimised on (TargetVectorConfig.chat_form)
    if wrapping is not None:
        return wrapping[0] + text + wrapping[1], True
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return rendered, True


def natural_answer(text: str) -> str:
    """The answer up to its natural end: leading space dropped, cut after the first line and after the
    first sentence."""
    text = text.lstrip()
    text = text.split("\n", 1)[0]
    end = _SENTENCE_END.search(text)
    return (text[:end.end()] if end else text).strip()


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS and every end-of-turn marker the tokenizer knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[m] for m in END_OF_TURN if m in vocab}
    return sorted(ids)


def chat_answers(model, questions: Sequence[str], max_new_tokens: int = CHAT_MAX_NEW_TOKENS,
                 batch_size: int = 16) -> list[str]:
    """Each question's greedy answer, asked in chat form and cut at its natural end."""
    tok = model.tokenizer
    rendered = [chat_input(tok, q)[0] for q in questions]
    templated = question_form(tok) == "chat"  # a rendered template holds its own special tokens
    raw = greedy_batch(model, rendered, max_new_tokens, batch_size, special_tokens=not templated,
                       stop_ids=end_of_turn_ids(tok), stop_strings=STOP_STRINGS)
    return [natural_answer(a) for a in raw]


def explain_asked(model, text: str, chat: bool, max_new_tokens: int, max_left_out: int | None = None):
    """``model.explain`` of ``text`` asked as a user asks it: with ``chat``, as one user turn of the
    chat template (the answer stops at an end of turn), else as plain text continued (``grace-hooks why``
    and ``GET /v1/explain``)."""
    kwargs = {} if max_left_out is None else {"max_left_out": max_left_out}
    if not chat:
        return model.explain(text, max_new_tokens, **kwargs)
    rendered, own_specials = chat_input(model.tokenizer, text)
    return model.explain(rendered, max_new_tokens, stop_ids=tuple(end_of_turn_ids(model.tokenizer)),
                         add_special_tokens=not own_specials, **kwargs)


def chat_success(answers: Sequence[str], targets: Sequence[str]) -> list[bool]:
    """Whether each answer contains its new target (whole words, case ignored)."""
    return [mentions(a, t) for a, t in zip(answers, targets, strict=True)]
