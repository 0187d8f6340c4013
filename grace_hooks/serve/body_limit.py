"""The request body limit: a body over it gets a 413 before it is read whole.

The server once read a 21 MB ``POST /v1/packs`` of 20,000 edit requests and grew to about 22 GiB (24 GB) before
the kernel killed it; JSON parsed into Python objects takes many times its bytes, and the edit it
asks for more again. Requests this server can use are far smaller (see ``ServeConfig``), so a
larger body is refused before it costs memory:

- with ``Content-Length``, from the header alone;
- without it (``Transfer-Encoding: chunked``), by counting the bytes as they arrive; at most the
  limit is held, then the body is handed on as one piece (the app reads it whole anyway).

After a 413 the rest of the body, if the client is sending it, is read and dropped (a bounded
amount, for a bounded time): a server that closes a connection with unread data makes the kernel
reset it, and most clients (the official OpenAI one, ``requests``, ``urllib``) then report a reset
connection instead of the message. A client that waits for ``100 Continue`` never sends it.
"""
from __future__ import annotations

import logging

import anyio

from .admission import send_json
from .errors import error_body

log = logging.getLogger(__name__)

DRAIN_BYTES = 64 << 20  # the most of a refused body read and dropped; beyond it the connection is just closed
DRAIN_S = 5.0  # and for at most this long (a client trickling bytes keeps nothing busy for long)
_CLOSE = [(b"connection", b"close")]


def size_text(n: int) -> str:
    """``1048576`` -> ``"1048576 bytes (1 MiB)"``: the exact number for the option, a readable one beside it."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n} bytes ({n / (1 << shift):.4g} {unit})"
    return f"{n} bytes"


class BodyLimit:
    """ASGI middleware: request bodies of more than ``limit`` bytes get a 413 in OpenAI's error layout."""

    def __init__(self, app, limit: int, option: str = "--max-body-bytes") -> None:
        if limit < 1:
            raise ValueError(f"the body limit must be at least 1 byte, not {limit}")
        self.app, self.limit, self.option = app, limit, option

    def message(self, declared: int | None) -> str:
        size = f"is {size_text(declared)}" if declared is not None else f"is more than {size_text(self.limit)}"
        return (f"the request body {size}; this server takes at most {size_text(self.limit)} per request. "
                f"Send less (edit requests can be split into several packs, POST /v1/packs once per part), "
                f"or start the server with a larger limit: grace-hooks serve {self.option} N")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # names are lower case in ASGI
        declared = headers.get(b"content-length")
        if declared is not None and declared.strip().isdigit():
            # The server's HTTP parser never hands on more bytes than declared, so the header is enough.
            if int(declared) > self.limit:
                await self._refuse(scope, receive, send, int(declared), headers)
                return
            await self.app(scope, receive, send)
            return
        # No length given: read up to the limit here, refusing as soon as it is passed.
        pieces, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                pieces.clear()
                await self._refuse(scope, receive, send, None, headers, more=message.get("more_body", False))
                return
            pieces.append(body)
            if not message.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": b"".join(pieces), "more_body": False}]
        pieces.clear()

        async def replay():
            return whole.pop() if whole else await receive()  # then disconnects, as the server reports them

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, declared: int | None, headers: dict, more: bool = True) -> None:
        message = self.message(declared)
        log.info("%s %s -> 413: %s", scope["method"], scope["path"], message)  # as the app logs refused input
        drain = more and b"100-continue" not in headers.get(b"expect", b"").lower() and \
            (declared is None or declared <= DRAIN_BYTES)
        await send_json(send, 413, error_body(413, message), _CLOSE, more_body=drain)
        if drain:  # the answer is out (its length is given); read the rest so that the close is clean
            await _drain(receive)
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive) -> None:
    left = DRAIN_BYTES
    with anyio.move_on_after(DRAIN_S):
        while left > 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            left -= len(message.get("body", b""))
