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

from ..errors import ConfigError, PackError
from ..eval.chat import explain_asked
from ..model import EditableModel
from .admission import Admission, Gate
from .body_limit import BodyLimit
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
    # Limits for a server others can reach (a 21 MB POST of 20,000 edit requests once grew the server
    # to about 22 GiB (24 GB) until the kernel killed it):
    # - 1 MiB holds what this server can use: a prompt filling a 128k-token context (about 4 bytes a
    #   token) or 1,000 CounterFact or zsRE edit records (300 to 420 KB); JSON parsed into Python
    #   objects takes several times its bytes, so this bounds a request's memory to some MiB.
    max_body_bytes: int = 1 << 20
    # - 1,000 edit requests per pack: the batch size the benchmarks build packs of (100 to 1,000)
    #   and minutes of computing; more in one request holds the edit lock for hours and the memory
    #   of the whole batch at once, while several packs of 1,000 stack to the same effect.
    max_edit_requests: int = 1000
    # - 16 requests may wait for the model (each of generations and pack changes); beyond, a 503 with
    #   Retry-After. Every waiting request holds a worker thread (40 in the pool), a connection and
    #   its body; the 16th in line waits 16 answers, long enough that it is better sent elsewhere.
    max_waiting: int = 16

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_edit_requests", "max_tokens", "completion_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServeConfig.{name} must be at least 1, not {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ConfigError(f"ServeConfig.max_waiting must be 0 or more, not {self.max_waiting}")


@dataclass
class ServerState:
    """What the routes share: the serving model, its packs, the config."""

    model: EditableModel
    live: LivePacks
    config: ServeConfig
    model_id: str
    gates: dict[str, Gate] = field(default_factory=dict)  # "generate" and "packs" (serve/admission.py)
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
    state = request.app.state.grace
    cap = state.config.max_edit_requests
    if len(body.requests) > cap:  # before anything slow: the cap is there to keep the edit from starting
        raise ApiError(413, f"this pack has {len(body.requests)} edit requests; this server computes at most {cap} "
                            f"in one POST /v1/packs. Split them into packs of at most {cap} (one POST each; packs "
                            f"stack, so together they edit the same), or start the server with a larger "
                            f"grace-hooks serve --max-edit-requests", param="requests")
    name = body.name or f"{body.method}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}"
    return state.live.create(NewPack(name, body.method, body.requests, body.options, body.supersede))


@packs_router.delete("/v1/packs/{name}")
def delete_pack(name: str, request: Request) -> dict[str, Any]:
    return request.app.state.grace.live.delete(name)


@packs_router.get("/v1/explain")
def explain(request: Request, prompt: str, max_tokens: int = 20, chat: bool = False) -> dict[str, Any]:
    """Why the greedy answer to ``prompt`` is what it is (``EditableModel.explain``), asked as plain text
    or, with ``chat=true``, as one user turn of the chat template."""
    state = request.app.state.grace
    if not 1 <= max_tokens <= state.config.max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {state.config.max_tokens}, not {max_tokens}",
                       param="max_tokens")
    return explain_asked(state.model, prompt, chat, max_tokens).to_dict()


def _needs_key(request: Request) -> bool:
    return request.method in ("POST", "PUT", "PATCH", "DELETE") and request.url.path.startswith("/v1/packs")


def _gate_for(gates: dict[str, Gate]):
    """Which gate a request passes: generations, or changes of the packs (reads pass freely)."""
    def choose(method: str, path: str) -> Gate | None:
        if method == "POST" and path in ("/v1/chat/completions", "/v1/completions") or path == "/v1/explain":
            return gates["generate"]
        if method == "POST" and path.rstrip("/") == "/v1/packs" or method == "DELETE" and path.startswith("/v1/packs/"):
            return gates["packs"]
        return None
    return choose


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
    # Generations and pack changes queue apart: with a side copy they run side by side, and each
    # waits for its own kind (turns.py; the edit lock).
    gates = {"generate": Gate("generations", config.max_waiting), "packs": Gate("pack changes", config.max_waiting)}
    app.state.grace = ServerState(model, live, config, config.model_id or model.name, gates)
    install_handlers(app)
    # The middleware added last runs first: the key check, then the queue, then the body limit, so
    # a request is refused for the cheapest reason first, and none is read past what it may hold.
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(Admission, choose=_gate_for(gates))

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
