"""Running the server: in the foreground (``grace-hooks serve``) or on a free local port in a
background thread (tests, benchmarks)."""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import uvicorn
from fastapi import FastAPI

from ..model import EditableModel
from .app import API_KEY_ENV, ServeConfig, create_app

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(model: str, adapters: str | Path, host: str = "127.0.0.1", port: int = 8000,
          config: ServeConfig | None = None, side_copy: bool = True) -> None:
    """Load ``model`` (and, with ``side_copy``, a second copy to compute edits on) with the packs of
    ``adapters``, then answer on ``host:port`` until interrupted."""
    config = config or ServeConfig(model_id=model)
    if not config.api_key and host not in LOCAL_HOSTS:
        log.warning("serving on %s without an API key: anyone who reaches it can add and delete packs "
                    "(set --api-key or %s)", host, API_KEY_ENV)
    serving = EditableModel.from_pretrained(model)
    workshop = EditableModel.from_pretrained(model) if side_copy else None
    try:
        app = create_app(serving, adapters, config, workshop=workshop)
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        serving.close()
        if workshop is not None:
            workshop.close()


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of ``host`` in a background thread; yields the
    base URL (``http://host:port``) and shuts the server down after the block."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))  # the OS picks a free port, and no other process can take it meanwhile
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="grace-hooks-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{port} within {timeout_s:.0f} s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)
        sock.close()
