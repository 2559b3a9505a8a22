"""The accelerator's batch-invariant projections (``tiled_linear``: one batched product of one
fixed shape per 1024 rows), checked where there is no accelerator: on the meta device for
the shapes every call sees, and on the CPU with the same code path forced
(``invariance.TILED_ON_CPU``) for values — sweeps' cells bit for bit the same in any batch,
and within 1e-4 of the naive oracle in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import patchserve.models.invariance as invariance
from engine.test_batch_invariance import CLEAN, CORRUPT, _check_invariant
from engine.test_sweep_exact import _assert_matches_naive, _clean_run
from models.helpers import loaded, tokenizer
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep
from patchserve.models import HOOKS
from patchserve.models.invariance import (
    ROW_BLOCK,
    TILE_BLOCKS,
    Linear,
    batch_invariant,
    tiled_linear,
    tiles_checked,
)

STEP = ROW_BLOCK * TILE_BLOCKS


class _Products(TorchFunctionMode):
    """Records the shapes of every batched product called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: set[tuple[tuple[int, ...], ...]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.bmm, torch.baddbmm):
            self.shapes.add(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tiled(monkeypatch):
    """The CPU takes the accelerator's path (no packed weights, tiled products)."""
    monkeypatch.setattr(invariance, "TILED_ON_CPU", True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tiled_row_is_the_same_wherever_it_sits(dtype, bias):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=gen).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype) if bias else None
    x = torch.randn(2 * STEP + 70, 80, generator=gen).to(dtype)
    full = tiled_linear(x, w, b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(full.float(), F.linear(x, w, b).float(), rtol=tol, atol=tol * 10)
    for lo, hi in ((0, 1), (3, 70), (64, STEP + 1), (STEP - 5, 2 * STEP + 70), (len(x) - 1, None)):
        assert torch.equal(tiled_linear(x[lo:hi], w, b), full[lo:hi])
    assert tiles_checked(w, b)
    assert tiled_linear(x[:0], w, b).shape == (0, 96)


@pytest.mark.parametrize("rows", [1, 63, STEP, STEP + 1, 3 * STEP - 7])
def test_every_product_of_an_accelerator_pass_has_one_shape(rows):
    """On a device other than the CPU (here meta: shapes only) a batch-invariant projection
    is batched products of one shape whatever the row count: one kernel configuration."""
    layer = Linear(48, 40, bias=True, device="meta")
    x = torch.empty(rows, 48, device="meta")
    with torch.inference_mode(), batch_invariant(), _Products() as seen:
        out = layer(x)
    assert out.shape == (rows, 40) and out.device.type == "meta"
    tile, weight = (TILE_BLOCKS, ROW_BLOCK, 48), (TILE_BLOCKS, 48, 40)
    bias = (TILE_BLOCKS, ROW_BLOCK, 40)
    assert seen.shapes == {(bias, tile, weight)}


def test_a_sweep_runs_tiled_products_where_forced(tiled, checkpoint_root):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("qwen3", checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    run = _clean_run(model, tok)
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, hook="mlp_out")
    with _Products() as seen:
        run_sweep(model, spec)
    assert seen.shapes, "no batched product ran"
    assert {s[-2][:2] for s in seen.shapes} == {(TILE_BLOCKS, ROW_BLOCK)}


@pytest.mark.parametrize("family", ["qwen3", "gpt2", "gemma2", "phi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_sweeps_are_batch_invariant(tiled, checkpoint_root, family, dtype):
    from checkpoints import build_checkpoint

    folder = build_checkpoint(family, checkpoint_root)
    model, tok = loaded(folder, dtype=dtype).model, tokenizer(folder)
    layers = list(range(model.cfg.num_layers))
    hooks = ["post_block", "attn_head"]
    run = capture_run(model, "clean", CLEAN, tok.encode(CLEAN).ids, dict.fromkeys(hooks, layers))
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, hooks=hooks, heads="all")
    _check_invariant(model, spec, picks=5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "olmo2"])
def test_tiled_sweeps_match_the_naive_oracle(tiled, checkpoint_root, family):
    from checkpoints import build_checkpoint

    folder = build_checkpoint(family, checkpoint_root)
    model, tok = loaded(folder).model, tokenizer(folder)
    run = _clean_run(model, tok)
    spec, _ = prepare_sweep(
        model, tok, prompt=CORRUPT, source=run, hooks=list(HOOKS), heads=[0], max_batch_tokens=64
    )
    _assert_matches_naive(model, spec, run_sweep(model, spec), run)
