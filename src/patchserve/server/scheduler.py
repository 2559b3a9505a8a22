"""One model, many requests: a fair gate around every batch the engine runs.

Each request runs in its own worker thread; before each forward batch it
takes a ticket and waits for its turn, so concurrent sweeps interleave batch
by batch in arrival order (no request starves behind a long grid) and only
one batch occupies the model at a time. A request's numbers do not depend on
what else runs: batches are never shared between requests.

A request whose client left (``patchserve.cancel``) gives up its place in
the queue within ``POLL_S``: its ticket is marked abandoned and skipped, so
the requests behind it never wait for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from patchserve.cancel import cancelled, raise_if_cancelled

POLL_S = 0.05  # how often a waiting request checks whether its client is still there


class FairGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._next_ticket - self._serving - len(self._abandoned)

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait(POLL_S)
                if ticket != self._serving and cancelled():
                    self._abandoned.add(ticket)
                    raise_if_cancelled()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                while self._serving in self._abandoned:
                    self._abandoned.remove(self._serving)
                    self._serving += 1
                self._cond.notify_all()
