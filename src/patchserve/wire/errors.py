"""The one error body of every 4xx and 5xx: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from patchserve.wire.base import WireModel

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
