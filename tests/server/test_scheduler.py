"""The fair gate: a request whose client left gives up its place without blocking others."""

from __future__ import annotations

import threading
import time

import pytest

from patchserve.cancel import cancel_scope, raise_if_cancelled
from patchserve.errors import Cancelled
from patchserve.server.scheduler import POLL_S, FairGate


def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_is_served():
    gate = FairGate()
    left = threading.Event()
    order: list[str] = []
    errors: list[BaseException] = []

    def wait_then(name: str, check=lambda: False) -> None:
        try:
            with cancel_scope(check), gate.turn():
                order.append(name)
        except Cancelled as exc:
            errors.append(exc)

    with gate.turn():  # the model is busy: both queue behind this batch
        leaver = threading.Thread(target=wait_then, args=("leaver", left.is_set))
        leaver.start()
        time.sleep(2 * POLL_S)
        stayer = threading.Thread(target=wait_then, args=("stayer",))
        stayer.start()
        time.sleep(2 * POLL_S)
        assert gate.waiting == 3
        left.set()
        leaver.join(timeout=1)
        assert not leaver.is_alive(), "a cancelled waiter must not wait for its turn"
        assert gate.waiting == 2
    stayer.join(timeout=1)
    assert order == ["stayer"] and len(errors) == 1 and gate.waiting == 0
    with gate.turn():  # and the gate still works
        pass


def test_outside_a_cancel_scope_nothing_is_cancelled():
    gate = FairGate()
    with gate.turn():
        pass
    raise_if_cancelled()
    with pytest.raises(Cancelled), cancel_scope(lambda: True):
        raise_if_cancelled()


def test_the_waiter_with_the_least_service_goes_first():
    """A request that has held the model for a while waits behind one that just came (a
    sweep sent during a long generation, a generation during a long sweep), whatever the
    order they asked in; first come, first served would serve the long one first."""
    gate = FairGate()
    order: list[str] = []
    worked, asked = threading.Event(), threading.Event()

    def long() -> None:
        for _ in range(3):  # its earlier batches: 0.3 s of service
            with gate.turn():
                time.sleep(0.1)
        worked.set()
        asked.wait(5)
        with gate.turn():
            order.append("long")

    def short() -> None:
        with gate.turn():
            order.append("short")

    first = threading.Thread(target=long)
    first.start()
    assert worked.wait(5)
    with gate.turn():  # the model is busy: the long one asks first, then the short one
        asked.set()
        time.sleep(2 * POLL_S)
        second = threading.Thread(target=short)
        second.start()
        time.sleep(2 * POLL_S)
        assert gate.waiting == 3
    first.join(5)
    second.join(5)
    assert order == ["short", "long"]
