"""Sweeps as an async stream of cell events (for servers and notebooks).

``stream_sweep`` runs the sweep in a worker thread and yields one
``("cell", Cell, done, total)`` item per graded cell, then ``("summary",
SweepOutcome)``. Closing the iterator early (a client that went away) sets the
sweep's cancel flag; the worker stops at its next transformer block.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

from patchserve.engine.sweep import Cell, SweepOutcome, SweepSpec, run_sweep
from patchserve.errors import Cancelled
from patchserve.models import Transformer

_DONE = object()


async def stream_sweep(
    model: Transformer,
    spec: SweepSpec,
    runner: Callable[[Callable[[], Any]], Any] | None = None,
    gate: Callable[[], AbstractContextManager[None]] | None = None,
    sweep: Callable[..., SweepOutcome] = run_sweep,
) -> AsyncIterator[tuple[Any, ...]]:
    """Yield ``("cell", cell, done, total)`` per cell, then ``("summary", outcome)``.

    ``runner`` executes the blocking sweep (default: a worker thread via
    ``asyncio.to_thread``); ``gate`` is entered around every model call; ``sweep``
    runs it (``run_sweep``'s signature; a noise study averages several, a replica pool
    spreads it over Ray actors).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()

    def on_cell(cell: Cell, done: int, total: int) -> None:
        # a copy: the consumer reads the cell later, and attribution+verify turns the very
        # estimate cells it streamed into exact ones once they are computed
        snapshot = replace(cell)
        loop.call_soon_threadsafe(queue.put_nowait, ("cell", snapshot, done, total))

    def work() -> SweepOutcome:
        return sweep(model, spec, on_cell=on_cell, cancel=cancelled.is_set, gate=gate)

    async def drive() -> None:
        try:
            if runner is None:
                outcome = await asyncio.to_thread(work)
            else:
                outcome = await runner(work)
            queue.put_nowait(("summary", outcome))
        except BaseException as exc:  # handed to the consumer below
            queue.put_nowait(("error", exc))
        finally:
            queue.put_nowait(_DONE)

    task = asyncio.create_task(drive())
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if item[0] == "error":
                if isinstance(item[1], Cancelled):
                    return
                raise item[1]
            yield item
    finally:
        cancelled.set()
        if not task.done():
            await task  # the worker stops before its next batch
