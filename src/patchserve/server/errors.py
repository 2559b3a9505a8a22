"""Domain errors and malformed requests → status codes and the one error body.

This module alone knows which status a failure gets: ``InvalidArgument`` 400,
``NotFound`` 404, ``Conflict`` 409, ``TooLarge`` 413,
``InsufficientStorage`` 507; a request pydantic
rejects is a 400 naming its field; anything unexpected is a 500 whose body
says only that (the exception goes to the server log, not to the client).
Work cancelled because the client left (``Cancelled``) is logged as such and
answered 499, which no one reads; work a shutdown stopped is a 503.
It also documents those answers for ``/openapi.json``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from patchserve.errors import (
    Cancelled,
    Conflict,
    InsufficientStorage,
    InvalidArgument,
    NotFound,
    StudyError,
    TooLarge,
)
from patchserve.wire.errors import ErrorBody, error_body, validation_message

log = logging.getLogger("patchserve.server")

STATUS: tuple[tuple[type[StudyError], int], ...] = (
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (InsufficientStorage, 507),
    (InvalidArgument, 400),
)

CLIENT_CLOSED = 499  # nginx's code for a client that left: counted in /metrics, never read

_DESCRIPTIONS = {
    400: "Invalid request (the error names the field in `param`)",
    401: "Missing or wrong API key (`--api-key`)",
    404: "A named run, module or model does not exist",
    409: "The name is taken (pass `overwrite: true`)",
    413: "Request body or prompt past the server's limits",
    500: "Internal error",
    503: "The server is shutting down: work still running when its grace period ended "
    "(`--shutdown-grace`) was stopped",
    507: "A run could not be saved (disk full, quota or I/O error); the store is unchanged",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status code with the error schema."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def status_of(exc: StudyError) -> int:
    return next((code for kind, code in STATUS if isinstance(exc, kind)), 400)


def error_response(message: str, code: int, param: str | None = None, kind: str | None = None):
    body = error_body(message, code, param, kind)
    return JSONResponse(body.model_dump(mode="json"), status_code=code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    return validation_message(list(exc.errors()))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StudyError)
    async def on_study_error(_request: Request, exc: StudyError) -> JSONResponse:
        return error_response(exc.message, status_of(exc), exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(Cancelled)
    async def on_cancelled(request: Request, exc: Cancelled) -> JSONResponse:
        if request.app.state.patchserve.stopping.is_set():
            message = "the server is shutting down and stopped this work; retry elsewhere or later"
            log.warning("%s %s: stopped by the shutdown", request.method, request.url.path)
            return error_response(message, 503)
        log.info("%s %s: the client left; its work was stopped", request.method, request.url.path)
        return error_response("the client closed the request", CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response("internal error (the server log has the details)", 500)


def without_validation_422(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents a 422 for every body; this server answers those with 400."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema
