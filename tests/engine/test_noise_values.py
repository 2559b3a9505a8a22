"""Noise corruption against independent numbers: hard-coded statistics, σ from the
checkpoint's weights read with ``transformers``, and the aggregate of per-sample sweeps
(issue 26's mutation check)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers as tf

from checkpoints import build_checkpoint
from models.helpers import loaded, tokenizer
from patchserve.engine import noise as noise_module
from patchserve.engine.noise import (
    MAX_SAMPLES,
    Noise,
    embedding_std,
    mean_stderr,
    noise_edit,
    noise_summary,
    noise_tensor,
    run_noised,
)
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep
from patchserve.text.alignment import align

CLEAN = "When Mary and John went to the store, John gave a drink to"


@pytest.mark.parametrize(
    "values", [[1.0, 2.0, 4.0], [0.5, -0.25], [3.0, 3.0, 3.0, 3.5], [-1.0, 7.0, 2.0, 0.0, 1.5]]
)
def test_mean_and_standard_error_of_the_mean(values):
    mean, stderr = mean_stderr(values)
    assert mean == pytest.approx(np.mean(values), abs=1e-15)
    assert stderr == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)), abs=1e-15)


def test_the_standard_error_by_hand_and_of_one_sample():
    # [1, 2, 4]: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9; /(n-1) = 7/3; /n = 7/9.
    assert mean_stderr([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt(7 / 9)), abs=1e-15)
    assert mean_stderr([2.5]) == (2.5, 0.0)


def _hf_sigma(folder) -> float:
    """σ of the embedding in the residual stream's units, from the transformers model."""
    hf = tf.AutoModelForCausalLM.from_pretrained(folder)
    weight = hf.get_input_embeddings().weight.detach().double()
    project_in = getattr(getattr(hf, "model", None), "decoder", None)
    project_in = getattr(project_in, "project_in", None)
    if project_in is not None:  # OPT-350m style: a narrower embedding, projected
        weight = weight @ project_in.weight.detach().double().T
    std = float(np.std(weight.numpy(), ddof=1))
    if "gemma" in hf.config.model_type:  # Gemma multiplies embeddings by sqrt(hidden)
        std *= math.sqrt(hf.config.hidden_size)
    return std


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "opt"])
def test_sigma_is_the_embedding_std_in_residual_units(family, checkpoint_root):
    folder = build_checkpoint(family, checkpoint_root)
    model = loaded(folder).model
    sigma = _hf_sigma(folder)
    assert embedding_std(model) == pytest.approx(sigma, rel=1e-5)
    noise = Noise(positions=[1, 3, 4], scale=2.5, samples=3, seed=11)
    for sample in (0, 2):
        z = noise_tensor(model, noise, sample)
        generator = torch.Generator().manual_seed(11 + sample)
        draw = torch.randn((3, model.cfg.hidden_size), generator=generator).double()
        assert z.dtype == torch.float32 and z.shape == (3, model.cfg.hidden_size)
        assert torch.allclose(z.double(), draw * 2.5 * sigma, rtol=1e-5, atol=1e-7)
    summary = noise_summary(model, noise, None)
    assert summary.sigma == pytest.approx(2.5 * sigma, rel=1e-5)
    assert (summary.positions, summary.scale, summary.samples, summary.seed) == (
        [1, 3, 4],
        2.5,
        3,
        11,
    )
    assert summary.corrupt_stderr == 0.0
    assert noise_summary(model, noise, 0.125).corrupt_stderr == 0.125


def test_noise_defaults_follow_rome():
    noise = Noise(positions=[0])
    assert (noise.scale, noise.samples, noise.seed) == (3.0, 10, 0)
    assert MAX_SAMPLES == 256


@pytest.fixture(scope="module")
def gpt2(checkpoint_root):
    folder = build_checkpoint("gpt2", checkpoint_root)
    return loaded(folder).model, tokenizer(folder)


def _spec(model, tok, metric="logprob"):
    ids = tok.encode(CLEAN).ids
    hooks = {"post_block": list(range(model.cfg.num_layers))}
    run = capture_run(model, "clean", CLEAN, ids, hooks)
    spec, _ = prepare_sweep(
        model, tok, prompt=CLEAN, source=run, hook="post_block", positions=[0, 2, -1], metric=metric
    )
    return spec


def test_noised_sweep_is_the_mean_of_per_sample_sweeps(gpt2):
    model, tok = gpt2
    spec = _spec(model, tok)
    noise = Noise(positions=[1, 2], scale=3.0, samples=3, seed=5)
    streamed = []
    outcome = run_noised(model, spec, noise, on_cell=lambda c, d, t: streamed.append((c, d, t)))
    each = [
        run_sweep(model, replace(spec, corrupt_edits=[noise_edit(model, noise, s)]))
        for s in range(3)
    ]
    grid = outcome.grids["post_block"]
    for i in range(len(spec.layers)):
        for j in range(len(spec.positions)):
            values = [o.grids["post_block"][i][j] for o in each]
            assert grid[i][j] == pytest.approx(float(np.mean(values)), abs=1e-12)
            sem = float(np.std(values, ddof=1) / math.sqrt(3))
            assert outcome.stderr["post_block"][i][j] == pytest.approx(sem, abs=1e-12)
    corrupts = [o.corrupt for o in each]
    assert outcome.corrupt == pytest.approx(float(np.mean(corrupts)), abs=1e-12)
    sem = float(np.std(corrupts, ddof=1) / math.sqrt(3))
    assert outcome.corrupt_stderr == pytest.approx(sem, abs=1e-12)
    assert outcome.noise_floor == max(o.noise_floor for o in each)
    probs = np.mean([torch.softmax(o.corrupt_logits.double(), -1).numpy() for o in each], 0)
    assert outcome.corrupt_logits.dtype == torch.float32
    assert np.allclose(outcome.corrupt_logits.numpy(), np.log(probs), atol=1e-6)
    # the argmax is the most restored averaged cell
    flat = [(grid[i][j], i, j) for i in range(len(grid)) for j in range(len(grid[0]))]
    best = max(flat)
    argmax = outcome.argmax["post_block"]
    assert argmax is not None and argmax.value == pytest.approx(best[0], abs=1e-15)
    assert (argmax.layer, argmax.position) == (spec.layers[best[1]], spec.positions[best[2]])
    # stats add up over the samples; cells are counted once
    for key in ("computed", "free", "batches", "flops"):
        assert outcome.stats[key] == sum(o.stats[key] for o in each), key
    assert outcome.stats["cells"] == each[0].stats["cells"] == spec.num_cells
    seconds = outcome.stats["seconds"]
    assert seconds > 0
    assert outcome.stats["cells_per_second"] == pytest.approx(spec.num_cells / seconds)
    # each cell streams once, when the last sample grades it, with its mean
    assert len(streamed) == spec.num_cells
    assert [d for _, d, _ in streamed] == list(range(1, spec.num_cells + 1))
    assert {t for _, _, t in streamed} == {spec.num_cells}
    for cell, _, _ in streamed:
        i, j = spec.layers.index(cell.layer), spec.positions.index(cell.position)
        assert cell.value == pytest.approx(grid[i][j], abs=1e-12)
        assert cell.stderr == pytest.approx(outcome.stderr["post_block"][i][j], abs=1e-12)


def test_a_noised_head_sweep_averages_every_head(gpt2):
    model, tok = gpt2
    ids = tok.encode(CLEAN).ids
    hooks = {h: list(range(model.cfg.num_layers)) for h in ("post_block", "attn_head")}
    run = capture_run(model, "clean", CLEAN, ids, hooks)
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CLEAN,
        source=run,
        hooks=["attn_head", "post_block"],
        heads=[0, 2],
        positions=[1, -1],
    )
    noise = Noise(positions=[1], samples=2, seed=9)
    outcome = run_noised(model, spec, noise)
    each = [
        run_sweep(model, replace(spec, corrupt_edits=[noise_edit(model, noise, s)]))
        for s in range(2)
    ]
    for hook in ("attn_head", "post_block"):
        grids = np.array([o.grids[hook] for o in each], dtype=np.float64)
        assert np.array(outcome.grids[hook]).shape == grids.shape[1:]
        assert np.allclose(np.array(outcome.grids[hook]), grids.mean(0), atol=1e-12)
        sem = grids.std(0, ddof=1) / math.sqrt(2)
        assert np.allclose(np.array(outcome.stderr[hook]), sem, atol=1e-12)
    assert np.array(outcome.grids["attn_head"]).shape == (model.cfg.num_layers, 2, 2)


def test_a_noised_sweep_of_a_longer_prompt_streams_its_skipped_cells(gpt2):
    model, tok = gpt2
    clean_ids = tok.encode(CLEAN).ids
    run = capture_run(model, "clean", CLEAN, clean_ids, {"post_block": [0, 1]})
    longer = CLEAN.replace("Mary", "Mary Ann")
    unpaired = align(clean_ids, tok.encode(longer).ids).unpaired()
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=longer,
        source=run,
        hook="post_block",
        layers=[0, 1],
        positions=[0, unpaired[0]],
    )
    streamed = []
    outcome = run_noised(
        model,
        spec,
        Noise(positions=[0], samples=2),
        on_cell=lambda c, d, t: streamed.append((c, d, t)),
    )
    assert outcome.skipped
    skipped = [c for c, _, _ in streamed if c.position == unpaired[0]]
    assert len(skipped) == 2 and all(c.value is None and c.skipped for c in skipped)
    assert all(row[1] is None for row in outcome.grids["post_block"])


def test_zero_seconds_give_zero_cells_per_second(gpt2):
    model, tok = gpt2
    spec = _spec(model, tok)
    outcome = run_sweep(model, spec)
    timeless = replace(outcome, stats={**outcome.stats, "seconds": 0.0})
    combined = noise_module._combine(spec, [timeless, timeless], {})
    assert combined.stats["seconds"] == 0.0 and combined.stats["cells_per_second"] == 0.0


def test_one_sample_has_zero_standard_errors(gpt2):
    model, tok = gpt2
    spec = _spec(model, tok, metric="prob")
    noise = Noise(positions=[1], samples=1, seed=3)
    outcome = run_noised(model, spec, noise)
    single = run_sweep(model, replace(spec, corrupt_edits=[noise_edit(model, noise, 0)]))
    assert outcome.grids == single.grids
    assert outcome.corrupt == single.corrupt and outcome.corrupt_stderr == 0.0
    assert all(v == 0.0 for row in outcome.stderr["post_block"] for v in row)
