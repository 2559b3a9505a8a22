"""The one error shape of every 4xx: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from patchserve.engine.errors import RequestError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
}


TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "literal"}


def error_body(message: str, code: int, param: str | None = None, kind: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": kind or ERROR_TYPES.get(code, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(message: str, code: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, code, param), status_code=code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors: list[dict[str, Any]] = list(exc.errors())
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc: list[str] = []
    for part in first.get("loc", ()):
        if part == "body":
            continue
        text = str(part)
        # pydantic names union members in the location ("alpha.int"); stop at the first one.
        if text in TYPE_TAGS or "[" in text or "-" in text:
            break
        loc.append(text)
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if first.get("type") == "missing":
        return f"missing required field {param}", param
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param}", param
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{param}: {message}{more}" if param else f"{message}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def on_request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.message, exc.code, exc.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}: {exc}", 500, None, "server_error"),
            status_code=500,
        )
