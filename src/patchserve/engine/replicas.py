"""Sweeps spread over Ray actors, each holding a model replica (``serve --replicas N``).

A sweep's swept layers are cut into contiguous blocks, one per actor, weighted
by the blocks each layer's cells recompute. A resume group of the sweep engine
is one hook at one layer, so every group — and its batches, its prefix-cache
reuse — stays whole on one actor: each cell is computed exactly as in one
process. The first block measures the noise floor (as the whole sweep would);
the others skip that probe row. The clean run (or the vector table) is put in
Ray's object store once per sweep, and each actor reads it from there once;
kept runs stay in the head's run store. Cells stream back from every actor as
they are graded and are merged into the head's one stream; the grids, the most
restored cells and the stats are assembled from them as one process would.

``ReplicaPool.run_sweep`` has ``run_sweep``'s signature, so the study service
uses it unchanged (``StudyResources.sweep``). Ray is an optional extra
(``pip install 'patchserve[ray]'``); nothing imports it unless a pool is made.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

import torch

from patchserve.cancel import raise_if_cancelled
from patchserve.engine.errors import Cancelled, SweepCancelled
from patchserve.engine.sweep import (
    Cell,
    SweepOutcome,
    SweepSpec,
    VectorSource,
    assemble_grids,
    run_sweep,
)
from patchserve.models import Transformer

COUNTERS = ("computed", "free", "batches", "flops")


def layer_blocks(layers: list[int], parts: int, num_layers: int) -> list[list[int]]:
    """``layers`` cut into at most ``parts`` contiguous non-empty blocks of similar work
    (a cell at layer ``l`` recomputes about ``num_layers - l`` blocks)."""
    parts = max(1, min(parts, len(layers)))
    weights = [num_layers - layer + 1 for layer in layers]
    blocks: list[list[int]] = []
    current: list[int] = []
    total, acc = sum(weights), 0.0
    for i, (layer, weight) in enumerate(zip(layers, weights, strict=True)):
        current.append(layer)
        acc += weight
        left_layers, left_blocks = len(layers) - i - 1, parts - len(blocks) - 1
        full = acc >= total * (len(blocks) + 1) / parts
        if left_blocks > 0 and (full or left_layers == left_blocks):
            blocks.append(current)
            current = []
    return [*blocks, current] if current else blocks


@dataclass
class VectorTable:
    """A vector source's vectors of one sweep, picklable (the head's library is not)."""

    vectors: dict[tuple[str, int], torch.Tensor]

    def __call__(self, hook: str, layer: int) -> torch.Tensor:
        return self.vectors[hook, layer]


def shippable_source(spec: SweepSpec) -> Any:
    """The sweep's source as it travels: a captured run as it is, a vector source as a table."""
    source = spec.source
    if not isinstance(source, VectorSource):
        return source
    table = {(h, layer): source.vector(h, layer) for h in spec.hooks for layer in spec.layers}
    return VectorSource(source.name, VectorTable(table))


class Replica:
    """One actor's model replica; ``sweep`` streams lists of graded cells, then the outcome."""

    def __init__(self, model: str, device: str, dtype: str, threads: int) -> None:
        from patchserve.models import load_model

        torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        self.model = load_model(model, device=device, dtype=dtype).model
        self.lock = threading.Lock()
        self.cancelled: dict[str, threading.Event] = {}

    def ready(self) -> bool:
        return True

    def cancel(self, sweep_id: str) -> None:
        self.cancelled.setdefault(sweep_id, threading.Event()).set()

    def sweep(self, sweep_id: str, spec: SweepSpec, source: Any) -> Iterator[tuple[str, Any]]:
        stop = self.cancelled.setdefault(sweep_id, threading.Event())
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        spec = replace(spec, source=source)

        def work() -> None:
            try:
                with self.lock:
                    on_cell = lambda cell, done, total: items.put(("cell", cell))
                    items.put(("outcome", run_sweep(self.model, spec, on_cell, stop.is_set)))
            except BaseException as exc:  # handed to the head, which raises it
                items.put(("error", exc))

        threading.Thread(target=work, daemon=True).start()
        try:
            yield from _drained(items)
        finally:
            self.cancelled.pop(sweep_id, None)


def _drained(items: queue.Queue[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Cells in lists of what has arrived (one object per list, not per cell), then the end."""
    while True:
        kind, item = items.get()
        if kind != "cell":
            yield kind, item
            return
        cells = [item]
        while True:
            try:
                kind, item = items.get_nowait()
            except queue.Empty:
                break
            if kind != "cell":
                yield "cells", cells
                yield kind, item
                return
            cells.append(item)
        yield "cells", cells


class ReplicaPool:
    """N Ray actors holding a replica of the model at ``model`` (a checkpoint folder)."""

    def __init__(
        self,
        model: str,
        replicas: int,
        device: str = "cpu",
        dtype: str = "float32",
        address: str | None = None,
        threads: int | None = None,
        cpus_per_replica: float = 1.0,
    ) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        actor: Any = ray.remote(Replica).options(max_concurrency=8, num_cpus=cpus_per_replica)
        per_actor = threads or max(1, int(cpus_per_replica))
        self.actors: list[Any] = [
            actor.remote(model, device, dtype, per_actor) for _ in range(replicas)
        ]
        ray.get([a.ready.remote() for a in self.actors])

    def run_sweep(
        self,
        model: Transformer,
        spec: SweepSpec,
        on_cell: Callable[[Cell, int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        gate: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> SweepOutcome:
        """``run_sweep`` over the replicas (``model`` and ``gate`` are the head's, unused)."""
        import ray

        if spec.source is None:
            raise ValueError("spec.source is not set (prepare_sweep(source=None) leaves it to you)")
        started = time.perf_counter()
        sweep_id = uuid.uuid4().hex
        source = ray.put(shippable_source(spec))
        blocks = layer_blocks(spec.layers, len(self.actors), model.cfg.num_layers)
        items: queue.Queue[tuple[int, str, Any]] = queue.Queue()
        for i, (actor, block) in enumerate(zip(self.actors, blocks, strict=False)):
            part = replace(spec, source=None, layers=block, probe_noise=i == 0)
            stream = actor.sweep.remote(sweep_id, part, source)
            threading.Thread(target=_forward, args=(i, stream, items), daemon=True).start()
        try:
            parts, cells = self._collect(items, len(blocks), spec.num_cells, on_cell, cancel)
        except BaseException:
            for actor in self.actors:
                actor.cancel.remote(sweep_id)
            raise
        return merge_outcomes(spec, parts, cells, time.perf_counter() - started)

    def _collect(
        self,
        items: queue.Queue[tuple[int, str, Any]],
        streams: int,
        total: int,
        on_cell: Callable[[Cell, int, int], None] | None,
        cancel: Callable[[], bool] | None,
    ) -> tuple[list[SweepOutcome], list[Cell]]:
        parts: dict[int, SweepOutcome] = {}
        cells: list[Cell] = []
        while len(parts) < streams:
            if cancel is not None and cancel():
                raise SweepCancelled("sweep cancelled")
            try:
                raise_if_cancelled()
            except Cancelled as exc:
                raise SweepCancelled("sweep cancelled") from exc
            try:
                index, kind, item = items.get(timeout=0.05)
            except queue.Empty:
                continue
            if kind == "error":
                raise item
            if kind == "outcome":
                parts[index] = item
                continue
            for cell in item:
                cells.append(cell)
                if on_cell is not None:
                    on_cell(cell, len(cells), total)
        return [parts[i] for i in range(streams)], cells


def _forward(index: int, stream: Any, items: queue.Queue[tuple[int, str, Any]]) -> None:
    """One actor's stream into the head's queue (a thread per actor)."""
    import ray

    try:
        for ref in stream:
            kind, item = ray.get(ref)
            items.put((index, kind, item))
    except BaseException as exc:  # the actor died, or Ray failed
        items.put((index, "error", exc))


def merge_outcomes(
    spec: SweepSpec, parts: list[SweepOutcome], cells: list[Cell], seconds: float
) -> SweepOutcome:
    """The outcome one process would have returned, from the blocks' outcomes and cells."""
    hi = {hook: i for i, hook in enumerate(spec.hooks)}
    li = {layer: i for i, layer in enumerate(spec.layers)}
    pi = {p: i for i, p in enumerate(spec.positions)}
    ki = {h: i for i, h in enumerate(spec.heads or [])}
    cells = sorted(
        cells,
        key=lambda c: (
            hi[c.hook],
            li[c.layer],
            -1 if c.position is None else pi[c.position],
            -1 if c.head is None else ki[c.head],
        ),
    )
    grids, argmax = assemble_grids(spec, cells)
    stats: dict[str, float | int] = {k: sum(p.stats[k] for p in parts) for k in COUNTERS}
    stats.update(
        seconds=seconds,
        cells=len(cells),
        cells_per_second=len(cells) / seconds if seconds > 0 else 0.0,
        replicas=len(parts),
    )
    return replace(
        parts[0],
        layers=spec.layers,
        grids=grids,
        argmax=argmax,
        skipped=[c for c in cells if c.skipped is not None],
        stats=stats,
    )
