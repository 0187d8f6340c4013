"""The README's main job in one call: edit four facts, ship them as a pack, reload, roll back.

``run_demo`` shows the base model's answers to each fact asked three ways (the edit's own prompt,
a paraphrase, and a question in chat form answered to its natural end), edits every request with
the default method into the pack ``demo-facts``, saves it into the demo's adapters folder, loads a
fresh model with that folder, shows the new answers, removes the pack in memory (the folder stays
on disk for the user to inspect) and checks that the answers are the base answers again.

The demo's folder is a per-user one outside any checkout (:func:`demo_adapters`), never the working
directory's ``adapters/``: a demo run in a clone of this repository must leave ``git status`` clean and
the user's own packs alone (the repository's ``adapters/`` is the user's folder, tracked with only
its README; the old-format pack the tests read lives in ``tests/fixtures/``).
"""
from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from ..bases.embedded import DEFAULT_MODEL, cache_dir
from ..config import DEFAULT_METHOD
from ..eval.chat import chat_answers
from ..eval.generation import greedy, mentions, reaches
from ..model import EditableModel
from ..requests import EditRequest, as_requests, read_requests

log = logging.getLogger(__name__)

DEMO_PACK = "demo-facts"
DEMO_MAX_NEW_TOKENS = 8


def demo_adapters() -> Path:
    """Where the demo saves its pack unless told otherwise: ``<cache>/demo/adapters`` (see :func:`cache_dir`)."""
    return cache_dir() / "demo" / "adapters"


def _demo_records() -> list[dict]:
    text = resources.files("grace_hooks").joinpath("data/demo_requests.json").read_text(encoding="utf-8")
    return json.loads(text)


def demo_requests() -> list[EditRequest]:
    """The four facts shipped in ``grace_hooks/data/demo_requests.json``."""
    return as_requests({k: v for k, v in r.items() if k != "question"} for r in _demo_records())


def demo_questions() -> list[str]:
    """A question per shipped fact, as a user would ask it in a chat."""
    return [r["question"] for r in _demo_records()]


def _asked(model, reqs: list[EditRequest], questions: list[str | None]) -> list[list[tuple[str, str, str]]]:
    """Per request, (how it was asked, text, answer): the prompt, the paraphrase and the chat question
    where the request has them."""
    rows: list[list[tuple[str, str, str]]] = []
    for req, question in zip(reqs, questions):
        asked = [("prompt", req.text, greedy(model, req.text, DEMO_MAX_NEW_TOKENS))]
        if req.rephrase_prompt:
            asked.append(("paraphrase", req.rephrase_prompt, greedy(model, req.rephrase_prompt, DEMO_MAX_NEW_TOKENS)))
        if question:
            asked.append(("question", question, chat_answers(model, [question])[0]))
        rows.append(asked)
    return rows


def _took(how: str, answer: str, target: str) -> bool:
    """The edit's prompt must start its continuation with the target; elsewhere the answer must say it."""
    return reaches(answer, target) if how == "prompt" else mentions(answer, target)


def _show(echo: Callable[[str], Any], title: str, reqs: list[EditRequest], rows, mark: bool = False) -> None:
    echo(title)
    for req, asked in zip(reqs, rows):
        for how, text, ans in asked:
            tag = ("[target] " if _took(how, ans, req.target_new) else "[missed] ") if mark else ""
            shown = ans.strip().replace("\n", "\\n")
            echo(f"  {tag}{how:>10}: {text} -> {shown}")


def run_demo(model: Any = DEFAULT_MODEL, adapters: str | os.PathLike | None = None,
             requests: str | os.PathLike | Iterable[EditRequest | dict] | None = None,
             echo: Callable[[str], Any] = print, method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """Edit, save, reload, roll back; returns a summary dict:
    ``before``, ``after``, ``rolled_back`` (per request, (how asked, text, answer) triples),
    ``success`` (edits whose prompt reaches the target), ``reached`` (per way of asking, how many
    answers hold the target), ``total``, ``identical`` (rolled-back answers == base answers) and
    ``pack`` (its folder). ``adapters``: the folder the pack is saved in (default :func:`demo_adapters`)."""
    adapters = Path(adapters) if adapters is not None else demo_adapters()
    if requests is None:
        reqs, questions = demo_requests(), demo_questions()
    else:
        reqs = read_requests(requests) if isinstance(requests, (str, os.PathLike)) else as_requests(requests)
        questions = [None] * len(reqs)

    echo(f"Loading base model {model} ...")
    base = EditableModel.from_pretrained(model)
    try:
        before = _asked(base, reqs, questions)
        _show(echo, "\nBase model answers (greedy; questions in chat form):", reqs, before)

        echo(f"\nEditing {len(reqs)} facts with {method} into pack {DEMO_PACK!r} ...")
        for r in reqs:
            echo(f"  {r.text} -> {r.target_new}" + (f"  (was {r.ground_truth})" if r.ground_truth else ""))
        info = base.edit(reqs, method=method, pack=DEMO_PACK)
        path = base.save_pack(DEMO_PACK, adapters, overwrite=True)
        echo(f"Saved {path} ({info.n_edits} edits, {info.nbytes} bytes of tensors, sites {', '.join(info.sites)})")
    finally:
        base.close()

    echo(f"\nLoading a fresh {model} with adapters={str(adapters)!r} ...")
    with EditableModel.from_pretrained(model, adapters=adapters) as edited:
        others = [p.name for p in edited.packs if p.name != DEMO_PACK]
        if others:
            echo(f"  (also loaded other packs from {adapters}: {', '.join(others)})")
        after = _asked(edited, reqs, questions)
        _show(echo, "\nEdited model answers:", reqs, after, mark=True)
        reached: dict[str, int] = {}
        for req, asked in zip(reqs, after):
            for how, _, ans in asked:
                reached[how] = reached.get(how, 0) + _took(how, ans, req.target_new)
        success = reached["prompt"]
        echo("Edits that took: " + ", ".join(f"{n}/{len(reqs)} {how}s" for how, n in reached.items()) + ".")

        edited.remove_pack(DEMO_PACK)
        rolled_back = _asked(edited, reqs, questions)
        _show(echo, f"\nAfter remove_pack({DEMO_PACK!r}) (rollback, in memory only):", reqs, rolled_back)
    identical = rolled_back == before
    if identical:
        echo("Rolled-back answers are identical to the base answers.")
    else:
        echo("Rolled-back answers differ from the base answers"
             + (f" (other packs are still loaded: {', '.join(others)})." if others else "."))
    echo(f"\nThe pack stays on disk at {Path(path)}; `grace-hooks rm {DEMO_PACK} --adapters {Path(path).parent}` drops it.")
    return {"before": before, "after": after, "rolled_back": rolled_back, "success": success, "reached": reached,
            "total": len(reqs), "identical": identical, "pack": str(path)}
