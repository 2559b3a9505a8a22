"""One model, many requests: a fair gate around every batch the engine runs.

Each request runs in its own worker thread (the generation scheduler in its own); before
each forward batch it takes a turn and waits for it, so only one batch occupies the model
at a time and concurrent work interleaves batch by batch. A request's numbers do not
depend on what else runs: batches are never shared between requests.

Who goes next is **least attained service** first: each account (a worker thread: one
request's sweep, or the generation scheduler's busy period) counts the seconds it has
held the gate, and when the gate frees, the waiter with the fewest goes (ties: arrival
order). A short request sent during a long one therefore finishes soon — a sweep during a
long generation, a generation during a long sweep — instead of waiting one of the long
request's batches per batch of its own; and no short request starves behind a long
grid. Because a request runs some Python between its batches (grading, sampling), an
account that releases the gate with less service than every waiter keeps its claim for
``GRACE_S`` (its next batch goes first if it comes back by then). Service decays with a
half-life of ``HALF_LIFE_S``, so a busy account (the generation scheduler under constant
traffic) is not starved for long by a newcomer: once the newcomer has held the gate about
as long recently, they alternate. An account idle for ``IDLE_S`` (a thread that served
another request before) starts again from zero.

A request whose client left (``patchserve.cancel``) gives up its place in
the queue within ``POLL_S``: its waiting turn is dropped, so the requests behind it
never wait for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from patchserve.cancel import cancelled, raise_if_cancelled

POLL_S = 0.05  # how often a waiting request checks whether its client is still there
GRACE_S = 0.03  # how long a returning account with the least service keeps its claim
IDLE_S = 1.0  # an account that asked for no turn this long starts from zero service
HALF_LIFE_S = 5.0  # attained service halves every this many seconds


class FairGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._holding = False
        self._waiters: dict[int, int] = {}  # ticket -> account, in arrival order
        self._service: dict[int, tuple[float, float]] = {}  # account -> (seconds held, when)
        self._released: dict[int, float] = {}  # account -> when it last released
        self._claim: tuple[int, float] | None = None  # (account, until)

    @property
    def waiting(self) -> int:
        """Turns waiting or running."""
        with self._cond:
            return len(self._waiters) + self._holding

    @contextmanager
    def turn(self) -> Iterator[None]:
        account = threading.get_ident()
        with self._cond:
            now = time.monotonic()
            if now - self._released.get(account, float("-inf")) > IDLE_S:
                self._service[account] = (0.0, now)
            ticket = self._next_ticket
            self._next_ticket += 1
            self._waiters[ticket] = account
            while not self._may_go(ticket, account, now):
                self._cond.wait(self._timeout(now))
                now = time.monotonic()
                if cancelled() and not self._may_go(ticket, account, now):
                    del self._waiters[ticket]
                    self._cond.notify_all()
                    raise_if_cancelled()
            del self._waiters[ticket]
            self._holding = True
            if self._claim is not None and self._claim[0] == account:
                self._claim = None
        start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                now = time.monotonic()
                self._holding = False
                mine = self._level(account, now) + now - start
                self._service[account] = (mine, now)
                self._released[account] = now
                others = [self._level(a, now) for a in self._waiters.values()]
                if others and mine < min(others):
                    self._claim = (account, now + GRACE_S)
                self._forget(now)
                self._cond.notify_all()

    def _may_go(self, ticket: int, account: int, now: float) -> bool:
        """Whether ``ticket`` takes the free gate now: the least service of the waiters,
        unless another account's claim still holds."""
        if self._holding:
            return False
        if self._claim is not None and self._claim[0] != account and now < self._claim[1]:
            return False
        best = min(self._waiters, key=lambda t: (self._level(self._waiters[t], now), t))
        return best == ticket

    def _level(self, account: int, now: float) -> float:
        """``account``'s attained service now (decayed)."""
        held, when = self._service.get(account, (0.0, now))
        return held * 0.5 ** ((now - when) / HALF_LIFE_S)

    def _timeout(self, now: float) -> float:
        if self._claim is not None and now < self._claim[1]:
            return min(POLL_S, self._claim[1] - now)
        return POLL_S

    def _forget(self, now: float) -> None:
        """Drop the accounts idle past ``IDLE_S`` (they start from zero anyway)."""
        waiting = set(self._waiters.values())
        for account in [a for a, t in self._released.items() if now - t > IDLE_S]:
            if account not in waiting:
                del self._released[account]
                self._service.pop(account, None)
