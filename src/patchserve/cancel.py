"""Cooperative cancellation: blocking work stops soon after its caller gives up.

The server runs a request's model work in a worker thread inside
``cancel_scope(flag)``, where ``flag()`` turns true when the client
disconnects. The hot paths call ``raise_if_cancelled()`` where stopping is
cheap and safe — between transformer blocks (``models/transformer.py``),
between sweep batches, while waiting for the fair gate
(``server/scheduler.py``) — and the work unwinds with ``Cancelled``. Outside a
scope a check costs one context-variable read. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from patchserve.errors import Cancelled

_CHECK: ContextVar[Callable[[], bool] | None] = ContextVar("patchserve_cancel", default=None)


@contextmanager
def cancel_scope(is_cancelled: Callable[[], bool]) -> Iterator[None]:
    """Work run inside (in this thread) stops at its next check once ``is_cancelled()``
    or the enclosing scope's check is true (scopes nest: server shutdown, then client)."""
    outer = _CHECK.get()
    check = is_cancelled if outer is None else (lambda: is_cancelled() or outer())
    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)


def cancelled() -> bool:
    check = _CHECK.get()
    return check is not None and check()


def raise_if_cancelled() -> None:
    if cancelled():
        raise Cancelled("the caller went away; the work was stopped")
