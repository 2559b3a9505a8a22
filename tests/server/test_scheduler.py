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
