"""One exact sweep, end to end: corrupt forward → cells → planned batches → values → outcome.

The parts, each in its own module: the corrupt forward and the answer lanes
(``sweep_lanes``), grading (``sweep_grading``), the cells' patched rows
(``sweep_rows``), the pure batch planner (``sweep_plan``) and the executor
(``sweep_executor``). :class:`SweepRunner` strings them together, reports each
cell as it is graded, polls for a cancel before every batch and measures the
noise floor with an unpatched row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from patchserve.cancel import raise_if_cancelled
from patchserve.engine.continuation import Continuation
from patchserve.engine.diagnostics import identical_prompts_warning
from patchserve.engine.errors import SweepCancelled
from patchserve.engine.runs import CapturedRun
from patchserve.engine.sweep import Cell, SweepOutcome, SweepSpec, assemble_grids
from patchserve.engine.sweep_executor import SweepExecutor
from patchserve.engine.sweep_grading import Score, graded_answer, sweep_grader
from patchserve.engine.sweep_lanes import CorruptLane, corrupt_forward, lane_forward
from patchserve.engine.sweep_plan import AttentionShape, Batch, ResumeKey, plan_batches
from patchserve.engine.sweep_rows import (
    PROBE,
    CellRows,
    PlannedCells,
    Row,
    probe_row,
    unpatched_row,
)
from patchserve.models import Transformer
from patchserve.text.alignment import Alignment, align


def sweep_warnings(spec: SweepSpec, unpatched_positions: set[int]) -> list[str]:
    """The spec's warnings, identical prompts, and positions an all-positions head left out."""
    source = spec.source
    out = list(spec.warnings)
    if isinstance(source, CapturedRun) and not spec.corrupt_edits:
        out += identical_prompts_warning(source.token_ids, spec.corrupt_ids)
    if unpatched_positions:
        out.append(
            "attn_head cells with per_position false patch every selected position that "
            "has a clean partner; positions "
            f"{sorted(unpatched_positions)} have none and were left unpatched"
        )
    return out  # every cell skipped cannot happen: no alignable position is a 400


class SweepRunner:
    """Runs one exact sweep on one model."""

    def __init__(
        self,
        model: Transformer,
        spec: SweepSpec,
        on_cell: Callable[[Cell, int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        gate: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.model, self.spec = model, spec
        self.gate = gate if gate is not None else nullcontext
        self.cfg = model.cfg
        self.on_cell = on_cell
        self.cancel = cancel
        self.done = 0
        self.total = spec.num_cells
        self.stats: dict[str, float | int] = {
            "computed": 0,
            "free": 0,
            "batches": 0,
            "flops": 0,
        }
        self.executor = SweepExecutor(model, self.gate, self.stats)

    def _emit(self, cell: Cell) -> None:
        self.done += 1
        if self.on_cell is not None:
            self.on_cell(cell, self.done, self.total)

    def _emit_planned(self, cell: Cell) -> None:
        """Report a cell settled while planning (skipped or free) — with ``spec.only``, later,
        once the total is known (:meth:`_report_free_wanted`)."""
        if self.spec.only is None:
            self._emit(cell)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise SweepCancelled("sweep cancelled")
        raise_if_cancelled()

    def run(self) -> SweepOutcome:
        started = time.perf_counter()
        spec = self.spec
        if spec.source is None:
            raise ValueError("spec.source is not set (prepare_sweep(source=None) leaves it to you)")
        alignment = None
        if isinstance(spec.source, CapturedRun):
            alignment = align(spec.source.token_ids, spec.corrupt_ids)
        with torch.inference_mode():
            base = corrupt_forward(self.model, spec, self.gate)
            foil = spec.foil_ids or (None if spec.foil is None else [spec.foil])
            continuation = Continuation.plan(graded_answer(spec, base.logits[0]), foil)
            corrupt = [
                lane_forward(self.model, spec, self.gate, base, tail) for tail in continuation.tails
            ]
            del base
            score, clean_value, raw_corrupt = sweep_grader(
                self.model, spec, self.gate, continuation, corrupt
            )
            baseline = float(score([c.logits[None] for c in corrupt])[0])
            reported_corrupt = raw_corrupt if spec.metric == "recovered" else baseline
            planned = self._plan_cells(corrupt[0], alignment, baseline)
            noise = self._execute(planned.rows, planned.free, corrupt, score, baseline)
        grids, argmax = assemble_grids(spec, planned.cells)
        seconds = time.perf_counter() - started
        self.stats.update(
            seconds=seconds,
            cells=len(planned.cells),
            cells_per_second=len(planned.cells) / seconds if seconds > 0 else 0.0,
        )
        return SweepOutcome(
            hooks=spec.hooks,
            layers=spec.layers,
            positions=spec.positions,
            heads=spec.heads if "attn_head" in spec.hooks else None,
            metric=spec.metric,
            answer=continuation.answer[0],
            foil=spec.foil,
            grids=grids,
            argmax=argmax,
            clean=clean_value,
            corrupt=reported_corrupt,
            noise_floor=noise,
            skipped=planned.skipped,
            alignment=alignment,
            corrupt_logits=corrupt[0].logits[0].float().cpu(),
            corrupt_ids=list(spec.corrupt_ids),
            stats=dict(self.stats),
            warnings=sweep_warnings(spec, planned.unpatched_positions),
            answer_ids=list(continuation.answer),
            foil_ids=continuation.foil,
            per_position=spec.per_position,
        )

    def _plan_cells(
        self, corrupt: CorruptLane, alignment: Alignment | None, baseline: float
    ) -> PlannedCells:
        """The grid's cells and their patched rows; skipped and free cells are reported."""
        rows = CellRows(self.spec, self.cfg.num_layers, corrupt, alignment, self._settle)
        return rows.plan(baseline)

    def _settle(self, cell: Cell) -> None:
        if cell.skipped is None:
            self.stats["free"] += 1
        self._emit_planned(cell)

    def plan(self, rows: list[tuple[ResumeKey, Row]], lanes: list[CorruptLane]) -> list[Batch]:
        """The batches of ``rows`` (the pure planner, given this model's shape)."""
        cfg = self.cfg
        shape = AttentionShape(cfg.num_heads, cfg.head_dim, cfg.attn_softcap is not None)
        return plan_batches(
            [(key, row.offset) for key, row in rows],
            [lane.length for lane in lanes],
            self.spec.max_batch_tokens,
            shape,
            cfg.num_layers,
            self.spec.probe_noise,
        )

    def _execute(
        self,
        rows: list[tuple[ResumeKey, Row]],
        free: list[Cell],
        corrupt: list[CorruptLane],
        score: Score,
        baseline: float,
    ) -> float:
        plan = self.plan(rows, corrupt)
        self._report_free_wanted(free, plan)
        noise: float | None = None
        for batch in plan:
            self._check_cancel()
            batch_rows = [rows[i][1] for i in batch.rows]
            if batch.probe:
                # an unpatched copy of the first row: the corrupt run, resumed
                device = self.model.device_of(batch.key.start)
                batch_rows.append(unpatched_row(batch_rows[0], batch.key, corrupt[0], device))
            values = score(self.executor.run(batch.key, batch_rows, corrupt))
            if batch_rows[-1].cell.hook == PROBE:
                noise = abs(float(values[-1]) - baseline)
                batch_rows = batch_rows[:-1]
            for row, value in zip(batch_rows, values.tolist(), strict=False):
                row.cell.value = value
                self._emit(row.cell)
            self.stats["computed"] += len(batch_rows)
            self.stats["batches"] += 1
        if noise is None:
            noise = self._probe_noise(corrupt, score, baseline) if self.spec.probe_noise else 0.0
        return noise

    def _report_free_wanted(self, free: list[Cell], plan: list[Batch]) -> None:
        """With ``spec.only`` (planned alone): the total, known at last, and the free cells."""
        if self.spec.only is None:
            return
        self.total = len(free) + sum(len(batch.rows) for batch in plan)
        for cell in free:
            self._emit(cell)

    def _probe_noise(self, corrupt: list[CorruptLane], score: Score, baseline: float) -> float:
        """Run one unpatched row through the sweep path (when no batch carried one)."""
        key, row = probe_row(self.spec, self.cfg.num_layers, corrupt[0])
        return abs(float(score(self.executor.run(key, [row], corrupt))[0]) - baseline)
