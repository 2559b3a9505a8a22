"""Typed exceptions of the patchserve client (httpx/OpenAI style).

Every 4xx/5xx answer of the server has the body
``{"error": {"message", "type", "param", "code"}}`` (docs/api.md §2); the client raises
the subclass of :class:`PatchServeError` that matches the status code, carrying
the server's message verbatim. Problems the client detects itself before
sending anything (a bad argument combination) are plain :class:`ValueError`.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import ValidationError

from patchserve.wire.errors import ErrorBody


class PatchServeWarning(UserWarning):
    """A study the server ran exactly but that is probably not what was meant (the sweep
    body's ``warnings``): an improbable answer whose spelling variant is likely, identical
    prompts, a span that occurs more than once."""


class PatchServeError(Exception):
    """An error answered by (or on the way to) a patchserve server.

    Attributes: ``message`` (the server's ``error.message``), ``status_code``
    (the HTTP status, or the ``code`` of an error event in a stream; ``None`` for
    a connection failure), ``type`` and ``param`` (the server's ``error.type``
    and ``error.param``) and ``response`` (the :class:`httpx.Response`, if any).
    """

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        type: str | None = None,
        param: str | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.response = response

    def __str__(self) -> str:
        prefix = f"{self.status_code}: " if self.status_code is not None else ""
        return f"{prefix}{self.message}"


class BadRequestError(PatchServeError):
    """400: the request is invalid (the message says which field and why)."""


class AuthenticationError(PatchServeError):
    """401: missing or wrong API key."""


class NotFoundError(PatchServeError):
    """404: an unknown run, module or route."""


class ConflictError(PatchServeError):
    """409: the run name is taken (pass ``overwrite=True`` to replace it)."""


class RequestTooLargeError(PatchServeError):
    """413: the prompt, the grid or the body is over the server's limits."""


class InternalServerError(PatchServeError):
    """5xx: the server failed (a bug: it should never happen)."""


class InsufficientStorageError(InternalServerError):
    """507: the server could not save the run (its disk is full); nothing was changed."""


class APIConnectionError(PatchServeError):
    """The server could not be reached, or the connection broke."""


class APIResponseError(PatchServeError):
    """The server answered something that is not the patchserve wire format."""


STATUS_ERRORS: dict[int, type[PatchServeError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLargeError,
    507: InsufficientStorageError,
}


def error_class(status_code: int) -> type[PatchServeError]:
    """The exception class for an HTTP status code."""
    if status_code in STATUS_ERRORS:
        return STATUS_ERRORS[status_code]
    return InternalServerError if status_code >= 500 else PatchServeError


def from_error_body(
    body: Any, status_code: int, response: httpx.Response | None = None
) -> PatchServeError:
    """The typed exception of an error body (the wire's ``ErrorBody``), or of anything else
    a server or a proxy in front of it sent."""
    try:
        error = ErrorBody.model_validate(body).error
    except ValidationError:
        error = None
    if error is not None:
        status = error.code if error.code >= 400 else status_code
        return error_class(status)(error.message, status, error.type, error.param, response)
    text = body if isinstance(body, str) else repr(body)
    return error_class(status_code)(
        f"HTTP {status_code}: {text[:500]}", status_code, None, None, response
    )


def from_response(response: httpx.Response) -> PatchServeError:
    """The typed exception of an error response (its body must have been read)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return from_error_body(body, response.status_code, response)
