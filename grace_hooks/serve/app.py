"""The server application: OpenAI endpoints plus ``/v1/packs``, over one EditableModel and its
adapters folder. :func:`create_app` builds it (tests use it directly; ``grace-hooks serve`` runs it
with uvicorn)."""
from __future__ import annotations

import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import PackError
from ..model import EditableModel
from .errors import ApiError, error_body, install_handlers
from .live_packs import LivePacks, NewPack
from .openai_routes import router as openai_router
from .schemas import PackRequest

log = logging.getLogger(__name__)

API_KEY_ENV = "GRACE_HOOKS_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """How the server behaves (the CLI's options)."""

    api_key: str | None = None  # when set, POST and DELETE on /v1/packs need "Authorization: Bearer <key>"
    model_id: str | None = None  # the name /v1/models gives and requests must use (default: the model's name)
    max_tokens: int = 512  # the most tokens one answer may ask for; also a chat answer's budget when it gives none
    completion_tokens: int = 16  # a completion's budget when it gives none (OpenAI's default)
    watch_s: float = 2.0  # how often the adapters folder is checked for packs other processes changed (0: never)


@dataclass
class ServerState:
    """What the routes share: the serving model, its packs, the config."""

    model: EditableModel
    live: LivePacks
    config: ServeConfig
    model_id: str
    started: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, requested: str) -> None:
        if requested != self.model_id:
            raise ApiError(404, f"model {requested!r} is not served here; this server serves {self.model_id!r} "
                                "(GET /v1/models)", "invalid_request_error", param="model")


packs_router = APIRouter()


@packs_router.get("/v1/packs")
def list_packs(request: Request) -> dict[str, Any]:
    return request.app.state.grace.live.listing()


@packs_router.post("/v1/packs", status_code=201)
def create_pack(body: PackRequest, request: Request) -> dict[str, Any]:
    name = body.name or f"{body.method}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}"
    return request.app.state.grace.live.create(NewPack(name, body.method, body.requests, body.options))


@packs_router.delete("/v1/packs/{name}")
def delete_pack(name: str, request: Request) -> dict[str, Any]:
    return request.app.state.grace.live.delete(name)


def _needs_key(request: Request) -> bool:
    return request.method in ("POST", "PUT", "PATCH", "DELETE") and request.url.path.startswith("/v1/packs")


def _key_ok(request: Request, key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def create_app(model: EditableModel, adapters: str | Path, config: ServeConfig | None = None,
               workshop: EditableModel | None = None) -> FastAPI:
    """An app that answers with ``model`` and the packs of ``adapters`` (made if missing), which it
    loads now: a pack that cannot be loaded fails here rather than being left out silently.
    ``workshop``: a second copy of the same base on which new packs are computed while ``model``
    goes on answering (None: computed on ``model``, and requests wait meanwhile)."""
    config = config or ServeConfig()
    Path(adapters).mkdir(parents=True, exist_ok=True)
    live = LivePacks(model, adapters, workshop)
    first = live.sync_with_folder(force=True)
    if live.folder_error or first.failed:
        raise PackError(f"the packs of {adapters} could not all be loaded, so the server does not start: "
                        f"{live.folder_error or first.failed}. Fix or remove those packs")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        live.watch(config.watch_s)
        try:
            yield
        finally:
            live.stop()

    app = FastAPI(title="grace_hooks", lifespan=lifespan)
    app.state.grace = ServerState(model, live, config, config.model_id or model.name)
    install_handlers(app)

    @app.middleware("http")
    async def write_key(request: Request, call_next):
        # Before the body is read, so a request without the key learns nothing else.
        if config.api_key and _needs_key(request) and not _key_ok(request, config.api_key):
            return JSONResponse(error_body(401, "this endpoint needs the server's API key: send the header "
                                                "'Authorization: Bearer <key>'", "authentication_error"), status_code=401)
        return await call_next(request)

    app.include_router(openai_router)
    app.include_router(packs_router)
    log.info("serving %s with %d pack(s) from %s", app.state.grace.model_id, len(model.packs), adapters)
    return app
