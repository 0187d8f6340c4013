"""Did an edit take? Whether each request's new target is now the greedy answer of its prompt.

Method-agnostic on purpose: it only decodes through the model as a user would (every loaded pack
acting), so it checks GRACE, delta and hook-layer packs alike, and a method's own training metric
(teacher-forced, on its own staged update) cannot hide a pack that does not land once applied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..eval.generation import greedy_batch, reaches
from ..requests import EditRequest, as_requests
from ..tokens import target_text


@dataclass(frozen=True)
class Took:
    """One request after the edit: ``answer`` is the greedy continuation of its prompt, as many
    tokens long as the target; ``took`` says whether it starts with the target."""

    prompt: str
    target: str
    answer: str
    took: bool


def target_token_count(tokenizer, prompt: str, target: str) -> int:
    """Tokens the target takes after ``prompt``: counted in context (merges across the boundary can
    change it) and alone, the larger of the two, so the answer is never cut short of the target."""
    cont = target_text(prompt, target)
    alone = len(tokenizer(cont, add_special_tokens=False)["input_ids"])
    in_context = len(tokenizer(prompt + cont)["input_ids"]) - len(tokenizer(prompt)["input_ids"])
    return max(1, alone, in_context)


def check_took(model, requests: Iterable[EditRequest | dict], batch_size: int = 16) -> list[Took]:
    """For each request, greedy-decode its prompt (filled with its subject) through ``model`` (an
    :class:`~grace_hooks.EditableModel` with the edit applied) and compare with its target."""
    reqs = as_requests(requests)
    prompts = [r.text for r in reqs]
    lengths = [target_token_count(model.tokenizer, r.text, r.target_new) for r in reqs]
    answers = greedy_batch(model, prompts, lengths, batch_size=batch_size)
    return [Took(p, r.target_new, a, reaches(a, r.target_new)) for p, r, a in zip(prompts, reqs, answers)]
