"""Text a model writes once (its C0 corpus, its context prefixes), kept as JSON so no machine writes it twice.

Looked up, by a name that carries the model's weights digest, in the cache folder, then among the
files the package ships (those of the embedded models, so a first edit on a fresh machine neither
samples a corpus nor writes prefixes), and only then made by the model and written to the cache.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, TypeVar

from ..bases.embedded import cache_dir

log = logging.getLogger(__name__)

T = TypeVar("T")


def cache_folder(kind: str, cache: Path | None | bool) -> Path | None:
    """``cache``: True = the library cache's ``kind`` folder, a path = that folder, False/None = no cache."""
    return (cache_dir() / kind) if cache is True else (Path(cache) if cache else None)


def kept_or_made(folder: Path | None, name: str, read: Callable[[str], T | None], shipped: Callable[[str], T | None],
                 make: Callable[[], T], dump: Callable[[T], dict], what: str) -> T:
    """The ``what`` named ``name``: from ``folder`` (``read`` parses a file's text, None when it is not
    one), else ``shipped(name)`` (not consulted without a cache folder, as tests of making ask), else
    ``make()``, written to ``folder`` as ``dump(value)`` by rename (a reader never sees half a file)."""
    path = None if folder is None else folder / name
    if path is not None and path.is_file():
        value = read(path.read_text(encoding="utf-8"))
        if value is not None:
            log.info("%s: from %s", what, path)
            return value
        log.warning("%s: %s is not a file of that kind; it is ignored", what, path)
    value = shipped(name) if folder is not None else None
    if value is not None:
        log.info("%s: shipped with the package (%s)", what, name)
        return value
    value = make()
    if path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dump(value)), encoding="utf-8")
        tmp.replace(path)
    return value


def read_json(text: str) -> object | None:
    try:
        return json.loads(text)
    except ValueError:
        return None


__all__ = ["cache_folder", "kept_or_made", "read_json"]
