"""Errors of the engine: the shared domain errors, and a cancelled sweep."""

from __future__ import annotations

from patchserve.errors import Cancelled, Conflict, InvalidArgument, NotFound, StudyError, TooLarge

__all__ = [
    "Cancelled",
    "Conflict",
    "InvalidArgument",
    "NotFound",
    "StudyError",
    "SweepCancelled",
    "TooLarge",
]


class SweepCancelled(Cancelled, RuntimeError):
    """The caller cancelled a sweep (client disconnect)."""
