"""An adapters folder shared by processes: one writer at a time, and saves that survive a crash.

- Writers (save, delete) and readers (listing, loading) take ``.grace_hooks.lock`` in the folder
  (``filelock``: an OS lock, released by the kernel when its process dies, so a ``kill -9`` leaves
  no stale lock). A second writer waits up to ``timeout`` seconds, then gets a clear error.
- A save writes ``.NAME.tmp-*`` completely, moves an existing ``NAME`` aside to ``.NAME.old-*``,
  renames the new folder into place, then deletes the old one. Whatever step a crash interrupts,
  :func:`recover` (run under the lock before every read and write) finishes the overwrite when
  the new folder was complete, or puts the old one back, and removes the leftovers.
- A folder that cannot be written (read-only media) is read without the lock or any recovery.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from ..errors import PackError

log = logging.getLogger(__name__)

LOCK_NAME = ".grace_hooks.lock"
LOCK_TIMEOUT_S = 60.0
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-[0-9a-f]{8}$")


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


@contextlib.contextmanager
def locked(directory: Path, timeout: float | None = None, create: bool = False) -> Iterator[bool]:
    """Hold the folder's lock inside the block (yields whether it is held: a read-only folder is
    read without it). ``timeout``: seconds to wait (default LOCK_TIMEOUT_S). ``create``: make the folder first (writers)."""
    directory = Path(directory)
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    if not directory.is_dir() or not _writable(directory):
        yield False
        return
    lock = FileLock(str(directory / LOCK_NAME), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise PackError(f"another process has held the lock of {directory} for {timeout:.0f} s (it is writing packs "
                        f"there); try again when it is done. The lock file is {directory / LOCK_NAME}") from None
    try:
        yield True
    finally:
        lock.release()


def recover(directory: Path, is_complete: Callable[[Path], bool]) -> list[str]:
    """Finish or undo saves a crash interrupted, and remove leftovers (call it under the lock).
    Returns what it did, one line per folder."""
    leftovers: dict[str, dict[str, list[Path]]] = {}
    for entry in Path(directory).iterdir():
        m = _LEFTOVER.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink():
            leftovers.setdefault(m["name"], {}).setdefault(m["kind"], []).append(entry)
    done = []
    for name, kinds in leftovers.items():
        final = Path(directory) / name
        if not final.exists():
            fresh = [p for p in kinds.get("tmp", []) if is_complete(p)]
            if fresh:  # the crash came between moving the old pack aside and renaming the new one in
                os.replace(fresh[0], final)
                done.append(f"{name}: finished an interrupted overwrite")
            elif kinds.get("old"):
                os.replace(kinds["old"][0], final)
                done.append(f"{name}: restored the pack an interrupted overwrite had moved aside")
        for paths in kinds.values():
            for p in paths:
                if p.exists():
                    shutil.rmtree(p, ignore_errors=True)
                    done.append(f"{name}: removed leftover {p.name}")
    for line in done:
        log.warning("%s: %s", directory, line)
    return done


def aside(final: Path, kind: str) -> Path:
    """A hidden sibling name for ``final`` (kind 'tmp', 'old' or 'del') that :func:`recover` knows."""
    return final.parent / f".{final.name}.{kind}-{uuid.uuid4().hex[:8]}"


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final``, moving an existing one aside first (see module doc)."""
    old = None
    if final.exists():
        old = aside(final, "old")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_new_dir(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Make the new folder ``dest`` whole or not at all: ``fill(tmp)`` writes a hidden sibling ``tmp``
    (it does not exist yet), which is then renamed to ``dest``; on any failure it is removed."""
    dest = Path(dest)
    if dest.exists():
        raise PackError(f"{dest} already exists; remove it or choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = aside(dest, "tmp")
    try:
        fill(tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def delete_dir(final: Path) -> None:
    """Remove a pack folder: renamed away first, so a crash never leaves half a pack under its name."""
    gone = aside(final, "del")
    os.replace(final, gone)
    shutil.rmtree(gone, ignore_errors=True)


__all__ = ["LOCK_NAME", "LOCK_TIMEOUT_S", "aside", "delete_dir", "locked", "recover", "replace_dir"]
