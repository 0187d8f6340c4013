"""Whose turn it is on the serving model: one generation at a time, and a change of the packs
before any generation that has not started yet.

The model's own lock is not fair: a change that waits for it can be overtaken again and again by
requests queued behind it, so under a steady load a new pack would go live late or never. Here a
change announces itself; from then on no new generation starts, and the change runs as soon as
the one generation in flight ends. Generations go in the order they arrived (a waking thread
would otherwise win at random, and some requests would wait many turns).
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
        self._issued = self._serving = 0  # generations go in the order they asked (tickets)
        self._gave_up: set[int] = set()  # tickets whose thread stopped waiting (an exception)

    @property
    def generations_waiting(self) -> int:
        return self._issued - self._serving - len(self._gave_up)

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _skip_gave_up(self) -> None:
        while self._serving in self._gave_up:
            self._gave_up.discard(self._serving)
            self._serving += 1

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        with self._cond:
            ticket, self._issued = self._issued, self._issued + 1
            try:
                self._cond.wait_for(lambda: not self._busy and not self.changes_waiting and self._serving == ticket)
            except BaseException:
                self._gave_up.add(ticket)
                self._skip_gave_up()
                self._cond.notify_all()
                raise
            self._busy, self._serving = True, self._serving + 1
            self._skip_gave_up()
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
