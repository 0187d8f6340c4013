"""What the command line shows while it works: the library's own INFO lines ("sampling the C0
corpus", "converting the GGUF file ...") always, so no long step is silent; third-party noise
(transformers' weight-loading bar, its deprecation chatter) only with ``-v``.
"""
from __future__ import annotations

import logging
import re
import sys
import warnings

# transformers >= 5.24 renamed the forward's past_key_values to cache and warns when the old name
# reaches it; it is harmless for users and says nothing about their edit.
_CACHE_RENAME = re.compile(r"past_key_values|cache_params")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _PlainFormatter(logging.Formatter):
    """The message alone for progress lines; 'warning: ...' where a person should look twice."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _DropCacheRename(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _CACHE_RENAME.search(record.getMessage())


def setup(verbose: bool) -> None:
    """INFO lines of ``grace_hooks`` on stderr (with level and logger name when ``verbose``); without
    ``verbose``, transformers' progress bars and its cache-rename warning are turned off."""
    logger = logging.getLogger("grace_hooks")
    logger.setLevel(logging.INFO)
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _PlainFormatter())
    _third_party(quiet=not verbose)


def _third_party(quiet: bool) -> None:
    from transformers.utils import logging as hf_logging

    root = hf_logging.get_logger()  # configures transformers' own handler
    for h in root.handlers:
        for f in [f for f in h.filters if isinstance(f, _DropCacheRename)]:
            h.removeFilter(f)
        if quiet:
            h.addFilter(_DropCacheRename())
    if quiet:
        hf_logging.disable_progress_bar()  # the "Loading weights" bar on every load
        warnings.filterwarnings("ignore", message=r".*(past_key_values|cache_params).*", category=FutureWarning)
    else:
        hf_logging.enable_progress_bar()
