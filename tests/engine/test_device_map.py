"""A model split over two stages (``cpu:0-1,cpu:2-3``) computes exactly what the unsplit
model does: full forward, a generated completion, an exact sweep grid (residual, branch and
attn_head sites, a window). The residual crosses the stage boundary through
``placement.transfer``, counted here, since cpu→cpu moves no bytes."""

from __future__ import annotations

import pytest
import torch

from checkpoints import build_checkpoint
from models.helpers import PROMPT, tokenizer
from patchserve.engine.generation import GenerationRequest, SteerVector, generate
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep
from patchserve.models import HookContext, load_model, make_edit, placement

CORRUPT = "When Mari and John went to the store, John gave a drink to"
SPLIT = "cpu:0-1,cpu:2-3"


@pytest.fixture(scope="module")
def pair(checkpoint_root):
    """gemma3: four layers, sliding and global attention, tied embeddings."""
    folder = build_checkpoint("gemma3", checkpoint_root)
    plain, split = load_model(folder).model, load_model(folder, device_map=SPLIT).model
    assert [(s.start, s.stop) for s in split.placement.stages] == [(0, 2), (2, 4)]
    return folder, plain, split


@pytest.fixture
def transfers(monkeypatch):
    """The layer-entering transfers of every pass, as the stage each one enters."""
    calls: list[torch.Size] = []
    real = placement.transfer

    def counted(x, device):
        calls.append(x.shape)
        return real(x, device)

    monkeypatch.setattr(placement, "transfer", counted)
    return calls


def test_forward_and_captures_equal_the_unsplit_model(pair, transfers):
    folder, plain, split = pair
    ids = torch.tensor([tokenizer(folder).encode(PROMPT).ids])
    sites = [(layer, "post_block") for layer in range(4)]
    want_hooks, got_hooks = HookContext.build(capture=sites), HookContext.build(capture=sites)
    want = plain(ids, want_hooks)
    assert len(transfers) == 1  # one stage: entered once
    got = split(ids, got_hooks)
    assert len(transfers) == 3  # two stages: the residual crosses at layer 2
    assert torch.equal(want, got)
    for site in sites:
        assert torch.equal(want_hooks.captured[site], got_hooks.captured[site])
    cached = split.prefill(ids)
    assert torch.equal(cached.logits, plain.prefill(ids).logits)
    assert all(k is not None for k in cached.cache.keys)


def test_generation_equals_the_unsplit_model(pair, transfers):
    folder, plain, split = pair
    tok = tokenizer(folder)
    steer = [SteerVector(layer=2, hook="post_attn", vector=torch.ones(64), scale=0.5)]
    patch = make_edit(3, "post_block", [0], [2], torch.zeros(64))
    req = GenerationRequest(
        prompt_ids=tok.encode(PROMPT).ids,
        max_tokens=6,
        temperature=0.8,
        seed=3,
        logprob_token_ids=range(16),
        edits=[patch],
        steer=steer,
    )
    want, got = generate(plain, tok, req), generate(split, tok, req)
    assert got.token_ids == want.token_ids and got.requested_logprobs == want.requested_logprobs
    assert want.requested_logprobs
    assert transfers  # the decoding steps crossed the boundary too


@pytest.mark.parametrize("window", [1, 2])
def test_sweep_grid_equals_the_unsplit_model(pair, transfers, window):
    folder, plain, split = pair
    tok = tokenizer(folder)
    hooks = ["pre_attn", "attn_out", "attn_head", "post_block"]
    outcomes = []
    for model in (plain, split):
        ids = tok.encode(PROMPT).ids
        run = capture_run(model, "clean", PROMPT, ids, {h: list(range(4)) for h in hooks})
        spec, _ = prepare_sweep(
            model, tok, prompt=CORRUPT, source=run, hooks=hooks, heads=[0, 3],
            max_batch_tokens=64, window=window,
        )  # fmt: skip
        before = len(transfers)
        outcomes.append(run_sweep(model, spec))
        outcomes[-1].stats["transfers"] = len(transfers) - before
    want, got = outcomes
    assert got.grids == want.grids and got.corrupt == want.corrupt and got.clean == want.clean
    assert want.stats["computed"] == got.stats["computed"] > 0
    # resumed passes from layers 0-1 enter both stages; those from 2-3 the second only
    assert got.stats["transfers"] > want.stats["transfers"]
