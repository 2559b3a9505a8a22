"""Streaming, cancellation and the memory-bounding batch planner."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager, nullcontext

import pytest
import torch

from models.helpers import loaded, tokenizer
from patchserve.engine.errors import InvalidArgument, SweepCancelled
from patchserve.engine.runs import capture_run
from patchserve.engine.stream import stream_sweep
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep
from patchserve.engine.sweep_lanes import corrupt_forward
from patchserve.engine.sweep_plan import SCORE_ELEMENTS_CAP
from patchserve.engine.sweep_rows import CellRows
from patchserve.engine.sweep_runner import SweepRunner
from patchserve.models import HOOKS
from patchserve.text.alignment import align

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"


@pytest.fixture
def study(checkpoint_root):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    n = model.cfg.num_layers
    run = capture_run(
        model, "clean", CLEAN, tok.encode(CLEAN).ids, {h: list(range(n)) for h in HOOKS}
    )
    return model, tok, run


def test_every_cell_is_reported_once_and_the_stream_equals_the_plain_call(study):
    model, tok, run = study
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hooks=["post_block", "attn_head"],
        heads=[0, 2],
        max_batch_tokens=40,
    )
    plain = run_sweep(model, spec)

    async def collect():
        events, summary = [], None
        async for item in stream_sweep(model, spec):
            if item[0] == "cell":
                events.append(item)
            else:
                summary = item[1]
        return events, summary

    events, summary = asyncio.run(collect())
    total = events[0][3]
    assert len(events) == total == spec.num_cells == 3 * len(spec.positions) * 3
    # The cell limit counts the same cells: exactly at the limit passes, one below fails.
    limits = dict(hooks=["post_block", "attn_head"], heads=[0, 2])
    prepare_sweep(model, tok, prompt=CORRUPT, source=run, max_cells=total, **limits)
    with pytest.raises(InvalidArgument, match=f"has {total} cells"):
        prepare_sweep(model, tok, prompt=CORRUPT, source=run, max_cells=total - 1, **limits)
    keys = {(c.hook, c.layer, c.position, c.head) for _, c, _, _ in events}
    assert len(keys) == total
    assert [e[2] for e in events] == list(range(1, total + 1))
    assert summary.grids == plain.grids
    for _, cell, _, _ in events:
        grid = summary.grids[cell.hook]
        i, j = spec.layers.index(cell.layer), spec.positions.index(cell.position)
        value = grid[i][j] if cell.head is None else grid[i][j][spec.heads.index(cell.head)]
        assert value == cell.value


def test_a_streamed_cell_is_what_it_was_when_emitted(study):
    """attribution+verify updates its estimate cells in place once verified; events read
    after the whole sweep ran (a slow consumer) still show the estimates first."""
    model, tok, run = study
    spec, _ = prepare_sweep(
        model, tok, prompt=CORRUPT, source=run, method="attribution+verify", verify_top_k=3
    )

    finished = threading.Event()

    async def in_a_thread(work):
        outcome = await asyncio.to_thread(work)
        finished.set()
        return outcome

    async def collect():
        items = []
        async for item in stream_sweep(model, spec, runner=in_a_thread):
            if not items:  # a slow consumer: the sweep ends before the next event is read
                await asyncio.to_thread(finished.wait, 60)
            items.append(item)
        return items

    items = asyncio.run(collect())
    cells = [item[1] for item in items if item[0] == "cell"]
    n = spec.num_cells
    assert [c.kind for c in cells] == ["estimate"] * n + ["exact"] * 3
    summary = items[-1][1]
    grid = summary.grids["post_block"]
    for cell in cells[n:]:
        assert grid[cell.layer][cell.position] == cell.value


def test_cancel_stops_before_the_next_batch(study):
    model, tok, run = study
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, max_batch_tokens=16)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(SweepCancelled):
        run_sweep(model, spec, cancel=cancel)
    assert len(calls) == 3


def test_closing_the_stream_cancels_the_worker(study):
    model, tok, run = study
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, max_batch_tokens=8)
    graded: list[int] = []
    ended: list[str] = []
    streamed = threading.Event()

    def sweep(model, spec, on_cell, cancel, gate):
        """run_sweep, holding every model call after the first streamed cell until the stream
        sets the cancel flag (10 s after that cell at most), so the worker cannot finish
        first."""

        deadline: list[float] = []

        def counted(cell, done, total):
            graded.append(total)
            on_cell(cell, done, total)
            deadline.append(time.monotonic() + 10)
            streamed.set()

        @contextmanager
        def held():
            while streamed.is_set() and not cancel() and time.monotonic() < deadline[0]:
                time.sleep(0.005)
            with gate() if gate is not None else nullcontext():
                yield

        try:
            outcome = run_sweep(model, spec, counted, cancel, held)
        except SweepCancelled:
            ended.append("cancelled")
            raise
        ended.append("finished")
        return outcome

    async def take_one():
        agen = stream_sweep(model, spec, sweep=sweep)
        first = await agen.__anext__()
        await agen.aclose()
        return first

    assert asyncio.run(take_one())[0] == "cell"
    # aclose waited for the worker, which stopped early instead of grading every cell
    assert ended == ["cancelled"]
    assert 0 < len(graded) < graded[0] == spec.num_cells


def test_batches_respect_the_token_budget_and_score_cap(study):
    model, tok, run = study
    for budget in (8, 64, 4096):
        spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, max_batch_tokens=budget)
        runner = SweepRunner(model, spec)
        with torch.inference_mode():
            corrupt = corrupt_forward(model, spec, nullcontext)
            alignment = align(run.token_ids, spec.corrupt_ids)
            rows = CellRows(spec, model.cfg.num_layers, corrupt, alignment, lambda c: None)
            planned = rows.plan(0.0).rows
        length = len(spec.corrupt_ids)
        plan = runner.plan(planned, [corrupt])
        assert sorted(i for b in plan for i in b.rows) == list(range(len(planned)))
        for key in {key for key, _ in planned}:
            batches = [[planned[i][1] for i in b.rows] for b in plan if b.key == key]
            for batch in batches:
                tokens = sum(length - r.offset for r in batch)
                assert tokens <= max(budget, length) or len(batch) == 1
                longest = max(length - r.offset for r in batch)
                scores = len(batch) * model.cfg.num_heads * longest * (length + longest)
                assert scores <= SCORE_ELEMENTS_CAP or len(batch) == 1
