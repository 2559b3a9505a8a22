"""Errors of the engine: the shared domain errors, and a cancelled sweep."""

from __future__ import annotations

from patchserve.errors import Conflict, InvalidArgument, NotFound, StudyError, TooLarge

__all__ = ["Conflict", "InvalidArgument", "NotFound", "StudyError", "SweepCancelled", "TooLarge"]


class SweepCancelled(RuntimeError):
    """The caller cancelled a sweep (client disconnect)."""
