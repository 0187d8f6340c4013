"""What more than one study uses (norm_aware_solve.py, paraphrase_misses.py): the records edited, the
C0 corpus they are edited with, and the ``--set`` options of the default method.

A study imports it as ``from common import ...`` (a script's own folder is on ``sys.path``).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from grace_hooks.errors import EditRequestError
from grace_hooks.eval.editors import MethodSpec
from grace_hooks.requests import EditRequest, record_to_request


def usable_requests(path: str, limit: int) -> list[EditRequest]:
    """The file's first ``limit`` records as edit requests, leaving out the few that are not usable as
    one (zsRE holds records with an empty answer)."""
    out = []
    for record in json.loads(Path(path).read_text(encoding="utf-8"))[:limit]:
        try:
            out.append(record_to_request(record).validate())
        except EditRequestError:
            continue
    return out


def corpus_file(records: list[EditRequest]) -> str:
    """A C0 corpus of CounterFact sentences beyond the edited records (``records[500:]``): sampling the
    model's own text takes about 20 minutes on Gemma here. Returns the file's path."""
    path = Path(tempfile.mkdtemp()) / "corpus.txt"
    path.write_text("\n\n".join(f"{r.text} {r.ground_truth}. {r.rephrase_prompt or ''}" for r in records[500:]),
                    encoding="utf-8")
    return str(path)


def method_overrides(text: str) -> dict:
    """``--set`` options of the default method, checked as the CLI checks them."""
    return dict(MethodSpec.parse(f"encore:{text}").overrides) if text else {}


def edit_bench(em, requests: list[EditRequest], records: list[EditRequest], overrides: str) -> None:
    """``requests`` edited in one call with the default method as pack "bench", with ``--set``
    ``overrides`` and C0 from :func:`corpus_file` of ``records``."""
    em.edit(requests, pack="bench", corpus=corpus_file(records), max_tokens=4000, corpus_probe=4000,
            **method_overrides(overrides))
