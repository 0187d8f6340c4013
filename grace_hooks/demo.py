"""The README's main job in one call: edit four facts, ship them as a pack, reload, roll back.

``run_demo`` shows greedy answers of the base model, edits every request with GRACE into the pack
``demo-facts``, saves it into the adapters folder, loads a fresh model with that folder, shows the
new answers, removes the pack in memory (the folder stays on disk as the shipped example) and
checks that the answers are the base answers again.
"""
from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

from .eval.generation import greedy, reaches
from .loading import DEFAULT_MODEL
from .model import EditableModel
from .requests import EditRequest, as_requests, read_requests

log = logging.getLogger(__name__)

DEMO_PACK = "demo-facts"
DEMO_MAX_NEW_TOKENS = 8


def demo_requests() -> list[EditRequest]:
    """The four facts shipped in ``grace_hooks/data/demo_requests.json``."""
    text = resources.files("grace_hooks").joinpath("data/demo_requests.json").read_text(encoding="utf-8")
    return as_requests(json.loads(text))


def _show(echo: Callable[[str], Any], title: str, reqs: list[EditRequest], answers: list[str], mark: bool = False) -> None:
    echo(title)
    for req, ans in zip(reqs, answers):
        tag = ""
        if mark:
            tag = "[target] " if reaches(ans, req.target_new) else "[missed] "
        shown = ans.rstrip().replace("\n", "\\n")
        echo(f"  {tag}{req.text} ->{shown}")


def run_demo(model: Any = DEFAULT_MODEL, adapters: str | os.PathLike = "adapters",
             requests: str | os.PathLike | Iterable[EditRequest | dict] | None = None,
             echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Edit, save, reload, roll back; returns a summary dict:
    ``before``, ``after``, ``rolled_back`` (answers), ``success`` (edits reaching their target),
    ``total``, ``identical`` (rolled-back answers == base answers) and ``pack`` (its folder)."""
    if requests is None:
        reqs = demo_requests()
    elif isinstance(requests, (str, os.PathLike)):
        reqs = read_requests(requests)
    else:
        reqs = as_requests(requests)
    prompts = [r.text for r in reqs]

    echo(f"Loading base model {model} ...")
    base = EditableModel.from_pretrained(model)
    try:
        before = [greedy(base, p, DEMO_MAX_NEW_TOKENS) for p in prompts]
        _show(echo, "\nBase model answers (greedy):", reqs, before)

        echo(f"\nEditing {len(reqs)} facts with GRACE into pack {DEMO_PACK!r} ...")
        for r in reqs:
            echo(f"  {r.text} -> {r.target_new}" + (f"  (was {r.ground_truth})" if r.ground_truth else ""))
        info = base.edit(reqs, method="grace", pack=DEMO_PACK)
        path = base.save_pack(DEMO_PACK, adapters, overwrite=True)
        metrics = base.pack(DEMO_PACK).metrics
        echo(f"Saved {path} ({info.n_edits} edits, {info.nbytes} bytes of tensors, site {', '.join(info.sites)}); "
             f"teacher-forced success {metrics.get('teacher_forced_success', float('nan')):.0%}")
    finally:
        base.close()

    echo(f"\nLoading a fresh {model} with adapters={str(adapters)!r} ...")
    with EditableModel.from_pretrained(model, adapters=adapters) as edited:
        others = [p.name for p in edited.packs if p.name != DEMO_PACK]
        if others:
            echo(f"  (also loaded other packs from {adapters}: {', '.join(others)})")
        after = [greedy(edited, p, DEMO_MAX_NEW_TOKENS) for p in prompts]
        _show(echo, "\nEdited model answers:", reqs, after, mark=True)
        success = sum(reaches(a, r.target_new) for a, r in zip(after, reqs))
        echo(f"{success}/{len(reqs)} edits reach their target.")

        edited.remove_pack(DEMO_PACK)
        rolled_back = [greedy(edited, p, DEMO_MAX_NEW_TOKENS) for p in prompts]
        _show(echo, f"\nAfter remove_pack({DEMO_PACK!r}) (rollback, in memory only):", reqs, rolled_back)
    identical = rolled_back == before
    if identical:
        echo("Rolled-back answers are identical to the base answers.")
    else:
        echo("Rolled-back answers differ from the base answers"
             + (f" (other packs are still loaded: {', '.join(others)})." if others else "."))
    echo(f"\nThe pack stays on disk at {Path(path)}; delete the folder (or `grace-hooks rm {DEMO_PACK}`) to drop it.")
    return {"before": before, "after": after, "rolled_back": rolled_back, "success": success,
            "total": len(reqs), "identical": identical, "pack": str(path)}
