"""A sweep cell's value is a function of the cell alone, bit for bit: the same whatever
other cells share its batch (the whole grid, a few cells, another batch budget).

That is what lets ``attribution+verify`` compute its top cells in batches of their own
and still return exactly the exact sweep's values (see ``patchserve.models.invariance``).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.helpers import loaded, tokenizer
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import SweepSpec, run_sweep
from patchserve.models.invariance import Linear, batch_invariant, blocked_linear, pack_checked
from patchserve.models.layout import ResumeRows

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"
HOOKS = ["post_block", "attn_head", "mlp_out"]


def _cells(outcome, spec: SweepSpec) -> dict[tuple, float | None]:
    """Every cell of ``outcome`` by its sweep key (hook, layer, position, head); layers,
    positions and heads are "all", so grid indices are the layers, positions, heads."""
    cells = {}
    for hook in spec.hooks:
        for layer, row in enumerate(outcome.grids[hook]):
            for i, value in enumerate(row):
                if not spec.per_position and hook == "attn_head":
                    cells[(hook, layer, None, i)] = value  # [layer][head]
                elif isinstance(value, list):  # attn_head per position: one per head
                    cells.update({(hook, layer, i, h): v for h, v in enumerate(value)})
                else:
                    cells[(hook, layer, i, None)] = value
    return cells


def _sweep(model, spec: SweepSpec, **changes):
    return run_sweep(model, SweepSpec(**{**spec.__dict__, **changes}))


def _check_invariant(model, spec: SweepSpec, picks: int = 7) -> None:
    """The full grid, the grid in one-row batches, and a few cells alone: bitwise equal."""
    full = _cells(run_sweep(model, spec), spec)
    assert _cells(_sweep(model, spec, max_batch_tokens=1), spec) == full
    computed = sorted((k for k, v in full.items() if v is not None), key=str)
    picked = random.Random(0).sample(computed, min(picks, len(computed)))
    alone = _cells(_sweep(model, spec, only=set(picked)), spec)
    assert {k: alone[k] for k in picked} == {k: full[k] for k in picked}


def test_cells_are_bitwise_the_same_in_any_batch(family_checkpoint):
    model, tok = loaded(family_checkpoint).model, tokenizer(family_checkpoint)
    layers = list(range(model.cfg.num_layers))
    run = capture_run(model, "clean", CLEAN, tok.encode(CLEAN).ids, dict.fromkeys(HOOKS, layers))
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, hooks=HOOKS, heads="all")
    _check_invariant(model, spec)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hook": "mlp_out", "window": 3},
        {"hook": "mlp_out", "answer_token": " Mary went home"},  # several tokens: lanes
        {"hook": "attn_head", "heads": "all", "per_position": False},
    ],
    ids=["window", "multi-token-answer", "heads-all-positions"],
)
def test_windows_lanes_and_head_grids_are_batch_invariant(checkpoint_root, kwargs):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    layers = list(range(model.cfg.num_layers))
    hooks = ["mlp_out", "attn_head"]
    run = capture_run(model, "clean", CLEAN, tok.encode(CLEAN).ids, dict.fromkeys(hooks, layers))
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, **kwargs)
    _check_invariant(model, spec, picks=3)


@pytest.mark.parametrize("shape", [(512, 1536), (1536, 512), (256, 4096)])
def test_a_projection_row_is_the_same_in_any_number_of_rows(shape):
    k, n = shape
    gen = torch.Generator().manual_seed(0)
    layer = Linear(k, n, bias=True)
    x = torch.randn(300, k, generator=gen)
    with torch.inference_mode():
        plain = layer(x)
        with batch_invariant():
            full = layer(x)
            for rows in (x[:1], x[5:12], x[100:261]):
                start = int((x == rows[0]).all(1).nonzero()[0])
                assert torch.equal(layer(rows), full[start : start + len(rows)])
    np.testing.assert_allclose(full, plain, rtol=1e-5, atol=1e-4)


def test_blocks_are_row_invariant_where_no_packed_path_is_used():
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(150, 64, generator=gen)
    full = blocked_linear(x, w, b)
    np.testing.assert_allclose(full, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    for lo, hi in ((0, 1), (3, 70), (64, 150)):
        assert torch.equal(blocked_linear(x[lo:hi], w, b), full[lo:hi])
    assert pack_checked(w.double(), None) is None  # float64: no packed path, blocks


def test_absolute_attention_needs_rows_that_end_together():
    rows = ResumeRows.build(torch.zeros(5, 8), torch.tensor([0, 2]), torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="end together"):
        rows.layout(4, absolute=True)
    ok = ResumeRows.build(torch.zeros(5, 8), torch.tensor([1, 2]), torch.tensor([3, 2]))
    assert ok.layout(4, absolute=True).end == 4


def test_the_multi_token_case_has_several_tokens(checkpoint_root):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    run = capture_run(model, "clean", CLEAN, tok.encode(CLEAN).ids, {"mlp_out": [0]})
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hook="mlp_out",
        layers=[0],
        answer_token=" Mary went home",
    )
    assert spec.answer_ids is not None and len(spec.answer_ids) > 1


@pytest.fixture
def two_threads():
    """Two intra-op threads (the kernels' work split follows the batch size only then)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cells_are_bitwise_the_same_with_several_threads(two_threads, tmp_path, dtype):
    """With two threads, the CPU's attention of one query per row splits its work by the
    number of rows; absolute attention runs in fixed batches of rows, so that never moves
    a cell's bits (found on benchmarks/gpu.py's small Qwen3 shape, 12 tokens)."""
    from patchserve.bench.sweep import build_checkpoint, prompts

    folder = build_checkpoint("qwen3", 3, 64, 300, tmp_path, heads=4, kv_heads=2)
    model = loaded(folder, dtype=dtype).model
    clean, corrupt = prompts(300, 12, 2)
    layers = list(range(3))
    run = capture_run(model, "clean", "", clean, {"post_block": layers})
    spec = SweepSpec(corrupt, ["post_block"], layers, list(range(12)), run)
    _check_invariant(model, spec, picks=12)
