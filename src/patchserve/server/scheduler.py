"""One model, many requests: a fair gate around every batch the engine runs.

Each request runs in its own worker thread; before each forward batch it
takes a ticket and waits for its turn, so concurrent sweeps interleave batch
by batch in arrival order (no request starves behind a long grid) and only
one batch occupies the model at a time. A request's numbers do not depend on
what else runs: batches are never shared between requests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class FairGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._next_ticket - self._serving

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()
