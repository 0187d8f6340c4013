"""A bounded queue in front of the model: requests past the queue get a 503 at once.

The model serves one generation at a time (:mod:`grace_hooks.serve.turns`) and computes one pack
at a time, and every request that waits for it holds a thread, its parsed body and a connection.
Without a bound a burst of clients grows the server until it runs out of threads or memory; with
one, the clients past the queue are told to come back (``Retry-After``), which the official
OpenAI client does by itself and a load balancer can act on (another replica).

A :class:`Gate` counts the requests inside (the one being served and those waiting their turn);
:class:`Admission`, an ASGI middleware, takes a slot of the gate a request needs before its body
is read, and gives it back when the answer has been sent or the client has gone.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Callable

from .errors import error_body

log = logging.getLogger(__name__)

# Retry-After bounds: at least a second (the header counts whole seconds), at most a minute (the
# official client waits for a Retry-After of up to 60 s and falls back to its own backoff beyond).
RETRY_MIN_S, RETRY_MAX_S = 1, 60


class Busy(Exception):
    """The gate is full: the request is refused with a 503 and ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class _Slot:
    """One admitted request: :meth:`release`, or leaving the ``with`` block, gives the slot back (once)."""

    def __init__(self, gate: "Gate", ahead: int) -> None:
        self.gate, self.ahead, self.start = gate, ahead, time.monotonic()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate._leave(self)

    def __enter__(self) -> "_Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Gate:
    """At most ``1 + max_waiting`` requests inside at once: one being served, the rest waiting.

    ``gate.admit()`` takes a slot at once or raises :class:`Busy` (it never waits: waiting is what
    it bounds); use its result as a context manager that gives the slot back."""

    def __init__(self, what: str, max_waiting: int, option: str = "--max-waiting") -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, not {max_waiting}")
        self.what, self.max_waiting, self.option = what, max_waiting, option
        self._lock = threading.Lock()  # slots are taken in the event loop but may be given back from any thread
        self.inside = 0
        # One request's service time, estimated from the requests that left: its time inside divided
        # by how many were inside (itself and those ahead) when it came in. Starts at a second.
        self.service_s = 1.0

    @property
    def waiting(self) -> int:
        return max(0, self.inside - 1)

    def retry_after_s(self) -> int:
        """When to come back: about when the request being served should be done and free a slot."""
        return min(RETRY_MAX_S, max(RETRY_MIN_S, math.ceil(self.service_s)))

    def admit(self) -> _Slot:
        with self._lock:
            if self.inside > self.max_waiting:  # one served and max_waiting waiting already
                wait = self.retry_after_s()
                raise Busy(f"the server is busy: {self.what} are served one at a time, one is in progress and "
                           f"{self.inside - 1} are waiting, the most it queues (grace-hooks serve {self.option}); "
                           f"retry in {wait} s", wait)
            slot = _Slot(self, self.inside)
            self.inside += 1
        return slot

    def _leave(self, slot: _Slot) -> None:
        took = time.monotonic() - slot.start
        with self._lock:
            self.inside -= 1
            self.service_s += 0.2 * (took / (slot.ahead + 1) - self.service_s)  # a moving average


Choose = Callable[[str, str], "Gate | None"]


class Admission:
    """ASGI middleware: the requests ``choose(method, path)`` gives a gate for pass it or get a 503.

    It sits before the body is read, so a refused request costs no memory, and the slot is held
    until the answer has been sent (a stream included) or the client has gone."""

    def __init__(self, app, choose: Choose) -> None:
        self.app, self.choose = app, choose

    async def __call__(self, scope, receive, send) -> None:
        gate = self.choose(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if gate is None:
            await self.app(scope, receive, send)
            return
        try:
            slot = gate.admit()
        except Busy as busy:
            log.info("%s %s -> 503: %s", scope["method"], scope["path"], busy.message)  # load shed as meant: no alarm
            await send_json(send, 503, error_body(503, busy.message, "server_error"),
                            [(b"retry-after", str(busy.retry_after_s).encode())])
            return
        async def send_then_leave(message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                slot.release()  # before the answer's last bytes go out: a client that has its answer has left the queue
            await send(message)

        with slot:  # and in any case (an error, a client that hung up) once the app is done
            await self.app(scope, receive, send_then_leave)


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = (),
                    more_body: bool = False) -> None:
    """A whole JSON answer through ASGI ``send`` (``more_body``: the final empty message is left to the caller)."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload, "more_body": more_body})
