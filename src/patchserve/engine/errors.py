"""The one error type the engine raises for a bad request (the server maps it to 4xx)."""

from __future__ import annotations


class RequestError(ValueError):
    """Bad input: ``message`` says what, ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.type = "invalid_request_error" if code == 400 else "request_error"


class SweepCancelled(RuntimeError):
    """The caller cancelled a sweep (client disconnect)."""
