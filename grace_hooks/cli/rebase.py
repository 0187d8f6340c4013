"""Rebase an adapters folder onto a new base: every pack recomputed from its stored requests and options.

A new version of a model changes its weights, so its packs (fingerprinted to the old weights) are
refused, rightly. Rebasing recomputes each pack, oldest first, with the method and options it
records, on the new base with the packs before it applied (as they were stacked), checks that each
request landed (:func:`~grace_hooks.cli.took.check_took`), and saves the new packs into a hidden
sibling folder. Only when every pack is done does the folder switch over: the old one is renamed
``DIR.before-rebase-STAMP`` (kept until the user removes it), the new one takes its name. A failure
before that leaves the folder as it was and removes the half-built one.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..errors import PackError
from ..store.adapters_dir import locked
from ..store.packs import load_pack, reading
from .took import check_took

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rebased:
    """One pack recomputed: how many of its requests landed on the new base, and how long it took."""

    name: str
    method: str
    requests: int
    landed: int
    seconds: float


def rebase_adapters(directory: str | Path, model, progress: Callable[[Rebased], None] = lambda row: None
                    ) -> tuple[list[Rebased], Path]:
    """Recompute every pack of ``directory`` on ``model`` (an :class:`~grace_hooks.EditableModel` of the
    new base, with no packs loaded) and switch the folder over. Returns the packs recomputed and where
    the old folder now is."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PackError(f"adapters folder {str(directory)!r} does not exist")
    if model.packs:
        raise PackError(f"the new base already has packs loaded ({[p.name for p in model.packs]}); rebase onto a "
                        "model without packs")
    with reading(directory) as paths:
        packs = [load_pack(p) for p in paths]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    staging = directory.parent / f".{directory.name}.rebase-{stamp}"
    rows: list[Rebased] = []
    try:
        for pack in packs:
            start = time.perf_counter()
            # the options as they ran (per-model defaults included): the new pack is the same edit on the new base
            model.edit(pack.requests, method=pack.method, pack=pack.name, **vars(pack.config))
            landed = sum(t.took for t in check_took(model, pack.requests))
            model.save_pack(pack.name, staging)
            rows.append(Rebased(pack.name, pack.method, len(pack.requests), landed, time.perf_counter() - start))
            progress(rows[-1])
        old = directory.parent / f"{directory.name}.before-rebase-{stamp}"
        with locked(directory):  # no other writer while the folders switch
            os.rename(directory, old)
            os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("rebased %d pack(s) of %s; the old folder is %s", len(rows), directory, old)
    return rows, old


__all__ = ["Rebased", "rebase_adapters"]
