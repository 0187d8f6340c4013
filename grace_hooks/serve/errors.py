"""Errors as OpenAI-style JSON bodies (``{"error": {"message", "type", "param", "code"}}``), which
the official client turns into its own exceptions; the library's own messages are passed on as
they are, since they already say what was wrong and what to do."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import ConfigError, EditError, EditRequestError, FingerprintMismatch, GraceHooksError, PackError, PackNameError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 200: its HTTP status, message and OpenAI error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def library_status(exc: GraceHooksError) -> int:
    """The HTTP status of one of the library's errors: the input was bad (400), the computed edit
    is not usable (422), or it clashes with what is loaded or on disk (409)."""
    if isinstance(exc, (PackNameError, EditRequestError, ConfigError)):
        return 400
    if isinstance(exc, EditError):
        return 422
    if isinstance(exc, (FingerprintMismatch, PackError)):
        return 409
    return 400


def error_body(status: int, message: str, kind: str | None = None, param: str | None = None) -> dict:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _response(status: int, message: str, kind: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind, param), status_code=status)


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def validation_message(exc: RequestValidationError) -> str:
    """One line per problem, naming the field (pydantic's own wording)."""
    lines = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            lines.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
        else:
            lines.append(f"{_where(tuple(err.get('loc', ())))}: {err.get('msg')}")
    return "; ".join(lines)


def install_handlers(app: FastAPI) -> None:
    """Every error the server raises on purpose, and malformed requests, answer in the OpenAI layout."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return _response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(GraceHooksError)
    async def _library(request: Request, exc: GraceHooksError) -> JSONResponse:
        status = library_status(exc)
        log.info("%s %s -> %d: %s", request.method, request.url.path, status, exc)
        return _response(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _response(400, validation_message(exc))

    @app.exception_handler(OSError)
    async def _disk(request: Request, exc: OSError) -> JSONResponse:  # e.g. an adapters folder that cannot be written
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _response(500, f"the server could not read or write a file: {exc}", "server_error")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _response(exc.status_code, str(exc.detail))
