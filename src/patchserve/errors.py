"""The domain errors every layer raises for a bad study; torch-free, HTTP-free.

The engine, the run store and the routes raise these; only
``patchserve.server.errors`` turns them into status codes and the wire error
body. Each carries ``message`` (what is wrong, in words a researcher can act
on) and ``param`` (the request field at fault, or ``None``).
"""

from __future__ import annotations


class StudyError(ValueError):
    """A study that cannot be run as asked."""

    def __init__(self, message: str, param: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.kind = kind  # a more precise error type for the wire body (``model_not_found``)


class InvalidArgument(StudyError):
    """A field with a value the study cannot use."""


class NotFound(StudyError):
    """A named thing (run, module, model) that does not exist."""


class Conflict(StudyError):
    """A name that is already taken (and no ``overwrite``)."""


class TooLarge(StudyError):
    """Input past one of the server's limits (prompt tokens, body bytes)."""


class Cancelled(Exception):
    """Work stopped because its caller went away (a client disconnect); no one waits for
    an answer. Not a ``StudyError``: nothing was wrong with the study."""


class InsufficientStorage(StudyError):
    """A run that could not be saved (disk full, quota, I/O error); nothing was changed."""
