"""Whose turn it is on the serving model: one generation at a time, and a change of the packs
before any generation that has not started yet.

The model's own lock is not fair: a change that waits for it can be overtaken again and again by
requests queued behind it, so under a steady load a new pack would go live late or never. Here a
change announces itself; from then on no new generation starts, and the change runs as soon as
the one generation in flight ends.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class Turns:
    """``with turns.generation():`` around one request's generation, ``with turns.change():`` around
    a change of the serving model's packs (see the module doc)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self.changes_waiting = 0

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._busy and not self.changes_waiting)
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextlib.contextmanager
    def change(self) -> Iterator[None]:
        with self._cond:
            self.changes_waiting += 1
            try:
                self._cond.wait_for(lambda: not self._busy)
            finally:  # counted off under the same lock that marks the model busy: no generation slips in between
                self.changes_waiting -= 1
                self._cond.notify_all()
            self._busy = True
        try:
            yield
        finally:
            self._release()
