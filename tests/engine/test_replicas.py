"""Sweeps over a local 2-actor Ray cluster equal the one-process sweep bit for bit.

``make test`` (which installs the ``ray`` extra) runs the block planner and one reduced
cluster test: two actors holding a 2-layer model stream one sweep. The full cluster tests
(a 3-layer model, every hook, the service, cancellation, head cells) are ``long``:
``make test-long``.
"""

from __future__ import annotations

import asyncio

import pytest

from models.helpers import loaded, tokenizer
from patchserve.engine.errors import SweepCancelled
from patchserve.engine.replicas import ReplicaPool, layer_blocks
from patchserve.engine.runs import capture_run
from patchserve.engine.service import Study, StudyResources
from patchserve.engine.stream import stream_sweep
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep
from patchserve.models import HOOKS
from patchserve.wire.requests import PatchSweepRequest

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (logical CPUs: room for both pools' two actors); the
    `ray` extra is part of make test's install, so a missing Ray fails here."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_session, checkpoint_root):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    yield folder, ReplicaPool(str(folder), replicas=2, threads=1)


@pytest.fixture(scope="module")
def small_cluster(ray_session, checkpoint_root):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3_2layer", checkpoint_root)
    yield folder, ReplicaPool(str(folder), replicas=2, threads=1)


def test_layer_blocks_are_contiguous_cover_every_layer_and_balance_work():
    assert layer_blocks([0, 1, 2, 3], 2, 4) == [[0, 1], [2, 3]]
    assert layer_blocks([0, 1, 2], 5, 3) == [[0], [1], [2]]
    assert layer_blocks([7, 2], 1, 8) == [[7, 2]]
    for layers in ([*range(28)], [3, 1, 2], [5]):
        blocks = layer_blocks(layers, 3, 28)
        assert [layer for block in blocks for layer in block] == layers
        assert all(blocks) and len(blocks) == min(3, len(layers))
    work = [sum(29 - layer for layer in block) for block in layer_blocks([*range(28)], 3, 28)]
    assert max(work) - min(work) <= 29  # within one layer's work of each other


def _streamed(model, spec, pool):
    async def collect():
        events, summary = [], None
        async for item in stream_sweep(model, spec, sweep=pool.run_sweep):
            if item[0] == "cell":
                events.append(item)
            else:
                summary = item[1]
        return events, summary

    return asyncio.run(collect())


def test_two_actors_of_a_two_layer_model_equal_one_process(small_cluster):
    """The reduced cluster test of `make test`: each actor takes one layer's cells."""
    folder, pool = small_cluster
    model, tok = loaded(folder).model, tokenizer(folder)
    assert model.cfg.num_layers == 2
    run = capture_run(model, "clean", CLEAN, tok.encode(CLEAN).ids, {"post_block": [0, 1]})
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        metric="logit_diff",
        answer_token_id=5,
        foil_token_id=9,
    )
    plain = run_sweep(model, spec)
    events, outcome = _streamed(model, spec, pool)
    assert [e[2] for e in events] == list(range(1, spec.num_cells + 1))
    assert {e[1].layer for e in events} == {0, 1}
    assert outcome.grids == plain.grids  # float equality: bit for bit
    assert (outcome.corrupt, outcome.noise_floor) == (plain.corrupt, plain.noise_floor)
    assert outcome.stats["replicas"] == 2
    assert outcome.stats["computed"] == plain.stats["computed"] > 0


@pytest.mark.long
def test_two_actors_stream_the_one_process_grid_bit_for_bit(cluster):
    folder, pool = cluster
    model, tok = loaded(folder).model, tokenizer(folder)
    n = model.cfg.num_layers
    run = capture_run(
        model, "clean", CLEAN, tok.encode(CLEAN).ids, {h: list(range(n)) for h in HOOKS}
    )
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hooks=["post_block", "attn_head", "mlp_out"],
        heads=[0, 2],
        metric="recovered",
        max_batch_tokens=40,
    )
    plain_cells = []
    plain = run_sweep(model, spec, on_cell=lambda cell, done, total: plain_cells.append(cell))
    events, outcome = _streamed(model, spec, pool)
    key = lambda c: (c.hook, c.layer, c.position, c.head, c.value, c.skipped)
    assert sorted(map(key, (e[1] for e in events)), key=str) == sorted(
        map(key, plain_cells), key=str
    )
    assert [e[2] for e in events] == list(range(1, spec.num_cells + 1))
    assert outcome.grids == plain.grids  # float equality: bit for bit
    assert {h: key(c) for h, c in outcome.argmax.items() if c} == {
        h: key(c) for h, c in plain.argmax.items() if c
    }
    assert (outcome.clean, outcome.corrupt, outcome.noise_floor) == (
        plain.clean,
        plain.corrupt,
        plain.noise_floor,
    )
    for counter in ("computed", "free", "batches", "flops"):
        assert outcome.stats[counter] == plain.stats[counter]
    assert outcome.stats["replicas"] == 2
    assert list(map(key, outcome.skipped)) == list(map(key, plain.skipped))


@pytest.mark.long
def test_a_vector_study_through_the_service_equals_the_plain_one(cluster):
    folder, pool = cluster
    model, tok = loaded(folder).model, tokenizer(folder)
    req = PatchSweepRequest(prompt=CORRUPT, source_module="zeros", hook="mlp_out", layers="all")
    plain = Study(StudyResources(model, tok, "m"), req).run()
    spread = Study(StudyResources(model, tok, "m", sweep=pool.run_sweep), req).run()
    timing = {"seconds", "cells_per_second"}
    assert spread.model_dump(exclude={"timing": timing}) == plain.model_dump(
        exclude={"timing": timing}
    )
    assert spread.timing.cells_computed == plain.timing.cells_computed > 0


@pytest.mark.long
def test_a_cancelled_spread_sweep_stops(cluster):
    folder, pool = cluster
    model, tok = loaded(folder).model, tokenizer(folder)
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=None)
    spec.source = capture_run(model, "c", CLEAN, tok.encode(CLEAN).ids, {"post_block": spec.layers})
    with pytest.raises(SweepCancelled):
        pool.run_sweep(model, spec, cancel=lambda: True)


@pytest.mark.long
def test_head_cells_over_all_positions_merge_as_one_process(cluster):
    folder, pool = cluster
    model, tok = loaded(folder).model, tokenizer(folder)
    run = capture_run(
        model, "c", CLEAN, tok.encode(CLEAN).ids, {"attn_head": list(range(model.cfg.num_layers))}
    )
    spec, _ = prepare_sweep(
        model, tok, prompt=CORRUPT, source=run, hook="attn_head", heads="all", per_position=False
    )
    plain = run_sweep(model, spec)
    spread = pool.run_sweep(model, spec)
    assert spread.grids == plain.grids and spread.noise_floor == plain.noise_floor
    assert (spread.argmax["attn_head"].layer, spread.argmax["attn_head"].head) == (
        plain.argmax["attn_head"].layer,
        plain.argmax["attn_head"].head,
    )
