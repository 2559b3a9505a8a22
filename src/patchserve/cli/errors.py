"""The command line's one error type: a user's mistake, reported as ``error: ...`` (exit 2)."""

from __future__ import annotations


class CommandError(Exception):
    """A user's mistake the command line reports in one line (exit status 2)."""
