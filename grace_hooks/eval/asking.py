"""The lifelong harness's answered-text figures: texts asked of the edited model and of the base, each
answered to its natural stop (:func:`~grace_hooks.eval.chat.chat_answers`), compared as a reader would.

Two sets of texts are asked of the same records:

- ``chat_*``: the record's own cloze prompt, paraphrase and locality prompt (kept for comparison
  with earlier runs; a cloze is not something users ask);
- ``question_*``: the questions a user would ask about the record (:mod:`grace_hooks.questions`):
  the direct question, a second wording, and the direct question about the locality subject.

Both go through the tokenizer's chat template where it has one and are plain greedy continuations
where it has none; ``question_form`` ("chat" / "plain") says which, and reports label the figures by it.
``subject_kept`` guards against an edit that changes what the answer is about rather than the fact:
of the answers in which the base names the record's subject, the share whose edited answer still does.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..requests import EditRequest
from .chat import CHAT_MAX_NEW_TOKENS, chat_answers, chat_success
from .generation import mentions
from ..questions import RelationTable, counterfact_table

N_EXAMPLES = 3  # (question, base answer, edited answer) rows kept per figure


def share(flags: Sequence[bool]) -> float | None:
    """The share of true flags; None when there are none to count."""
    return float(np.mean(flags)) if len(flags) else None


def unchanged(edited: Sequence[str], base: Sequence[str]) -> list[bool]:
    """Whether each edited answer is the base's answer, word for word."""
    return [a == b for a, b in zip(edited, base, strict=True)]


def subject_kept(edited: Sequence[str], base: Sequence[str], subjects: Sequence[str]) -> list[bool]:
    """For each answer in which the base names its subject (whole words, case ignored): whether the
    edited answer names it too. Answers whose base does not name the subject are left out."""
    return [mentions(e, s) for e, b, s in zip(edited, base, subjects, strict=True) if mentions(b, s)]


def examples(questions: Sequence[str], base: Sequence[str], edited: Sequence[str]) -> list[list[str]]:
    """(question, base answer, edited answer): what a reader needs to see what a figure means."""
    return [[q, b, a] for q, b, a in zip(questions[:N_EXAMPLES], base[:N_EXAMPLES], edited[:N_EXAMPLES])]


class Asker:
    """Asks texts with the edits on and off. The base's answers are kept in ``cache`` under the caller's
    key (what was asked, of which records): the base never changes, so each is asked of it once."""

    def __init__(self, model, editor, cache: dict, batch_size: int, max_new_tokens: int = CHAT_MAX_NEW_TOKENS) -> None:
        self.model, self.editor, self.cache = model, editor, cache
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def _answers(self, texts: list[str]) -> list[str]:
        return chat_answers(self.model, texts, self.max_new_tokens, self.batch_size)

    def __call__(self, key: tuple, texts: list[str]) -> tuple[list[str], list[str]]:
        edited = self._answers(texts)
        key = (*key, self.max_new_tokens)  # a shorter cap gives other answers
        if key not in self.cache:
            with self.editor.disabled():
                self.cache[key] = self._answers(texts)
        return edited, self.cache[key]


def chat_metrics(ask: Asker, requests: Sequence[EditRequest], idx: list[int], unrelated: set[int]) -> dict[str, Any]:
    """The records' own prompts asked as they are: the prompt's and the paraphrase's answers contain the
    new target; unrelated answers equal the base's (also over the records in ``unrelated`` alone:
    locality prompts that name no edited subject)."""
    out: dict[str, Any] = {"chat_sample_size": len(idx)}
    for part, field in (("prompt", "text"), ("rephrase", "rephrase_prompt"), ("locality", "locality_prompt")):
        rows = [i for i in idx if getattr(requests[i], field)]
        if not rows:
            continue
        texts = [getattr(requests[i], field) for i in rows]
        edited, base = ask((part, tuple(rows)), texts)
        if part == "locality":
            same = unchanged(edited, base)
            out["chat_locality"] = share(same)
            out["chat_locality_unrelated"] = share([s for i, s in zip(rows, same) if i in unrelated])
            continue
        targets = [requests[i].target_new for i in rows]
        name = "chat_success" if part == "prompt" else "chat_success_rephrase"
        out[name] = share(chat_success(edited, targets))
        out[name + "_base"] = share(chat_success(base, targets))
        out[name + "_examples"] = examples(texts, base, edited)
    return out


def question_metrics(ask: Asker, requests: Sequence[EditRequest], idx: list[int], unrelated: set[int],
                     table: RelationTable | None = None) -> dict[str, Any]:
    """The records asked the way users ask (see the module docstring). Records without questions (a cloze
    of a relation the table does not know) are counted in ``question_unmatched`` and left out; locality
    questions exist only where the locality subject could be recovered (``question_locality_size``)."""
    table = table or counterfact_table()
    asked = {i: table.questions(requests[i]) for i in idx}
    rows = [i for i in idx if asked[i] is not None]
    out: dict[str, Any] = {"question_sample_size": len(rows), "question_unmatched": len(idx) - len(rows)}
    kept: list[bool] = []
    for name, field in (("question_success", "question"), ("question_success_rephrase", "rephrase")):
        part = [i for i in rows if getattr(asked[i], field)]
        if not part:
            continue
        texts = [getattr(asked[i], field) for i in part]
        edited, base = ask((name, tuple(part)), texts)
        targets = [requests[i].target_new for i in part]
        out[name] = share(chat_success(edited, targets))
        out[name + "_base"] = share(chat_success(base, targets))
        out[name + "_examples"] = examples(texts, base, edited)
        kept += subject_kept(edited, base, [requests[i].subject for i in part])
    out["subject_kept"], out["subject_kept_n"] = share(kept), len(kept)
    part = [i for i in rows if asked[i].locality]
    out["question_locality_size"] = len(part)
    if part:
        edited, base = ask(("question_locality", tuple(part)), [asked[i].locality for i in part])
        same = unchanged(edited, base)
        out["question_locality"] = share(same)
        out["question_locality_unrelated"] = share([s for i, s in zip(part, same) if i in unrelated])
    return out
