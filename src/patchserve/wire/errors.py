"""The one error body of every 4xx and 5xx: ``{"error": {message, type, param, code}}``,
and how a request pydantic rejects is described in it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from patchserve.wire.base import WireModel
from patchserve.wire.hooks import hook_suggestion

TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "literal"}

#: The error ``type`` of each status code (OpenAI's names where they have one).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    507: "insufficient_storage",
    500: "server_error",
    503: "service_unavailable",
}


class ErrorDetail(WireModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorBody(WireModel):
    error: ErrorDetail


def error_body(
    message: str, code: int, param: str | None = None, kind: str | None = None
) -> ErrorBody:
    """The body for status ``code``; ``kind`` overrides the type (``model_not_found``)."""
    detail = ErrorDetail(
        message=message,
        type=kind or ERROR_TYPES.get(code, "server_error"),
        param=param,
        code=code,
    )
    return ErrorBody(error=detail)


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """``(message, param)`` of pydantic's errors for a request body, in words a user acts on
    (the server's 400 and the command line's ``error:`` line alike)."""
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
    kind = first.get("type")
    if kind == "json_invalid":
        return "request body is not valid JSON", None
    if kind == "lone_surrogate":
        return message, first["ctx"]["param"] or None
    if kind == "model_attributes_type" and param is None:
        return "the request body must be a JSON object (Content-Type: application/json)", None
    if kind == "missing":
        if param is None:
            return "the request needs a JSON body", None
        return f"missing required field {param}", param
    if kind == "extra_forbidden":
        return f"unknown field {param}", param
    if kind == "literal_error" and param is not None:
        noun = next((p for p in reversed(loc) if not p.isdigit()), param).removesuffix("s")
        expected = first.get("ctx", {}).get("expected", "")
        given = first.get("input")
        suggestion = hook_suggestion(given) if noun == "hook" and isinstance(given, str) else None
        hint = f" ({suggestion})" if suggestion else ""
        return f"unknown {noun} {given!r}; expected one of {expected}{hint}", param
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{param}: {message}{more}" if param else f"{message}{more}", param
