"""Window restores and noise-corrupted sweeps equal a naive per-cell computation on the
reference model (every family), and a seed gives the same grid bit for bit."""

from __future__ import annotations

import pytest
import torch

from engine.oracles import (
    mean_and_stderr,
    naive_cell,
    reference_grader,
    reference_noise,
    reference_sigma,
)
from models.helpers import loaded, tokenizer
from patchserve.engine.noise import Noise, noise_tensor, run_noised
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep, window_layers
from patchserve.models import HOOKS

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"
TOL = 1e-4


def _run(model, tok, prompt):
    n = model.cfg.num_layers
    ids = tok.encode(prompt).ids
    return capture_run(model, "clean", prompt, ids, {h: list(range(n)) for h in HOOKS})


def _window_source(run, hook, layers, position, head):
    rows = {w: run.row(hook, w, position) for w in layers}
    return {w: r if head is None else r[head] for w, r in rows.items()}


def test_window_layers_follow_rome():
    # ROME: range(max(0, l - w // 2), min(L, l - (-w // 2)))
    assert window_layers(5, 10, 48) == list(range(0, 10))
    assert window_layers(20, 10, 48) == list(range(15, 25))
    assert window_layers(46, 10, 48) == list(range(41, 48))
    assert window_layers(3, 1, 8) == [3]
    assert window_layers(3, 2, 8) == [2, 3]
    assert window_layers(3, 3, 8) == [2, 3, 4]


def test_window_cells_match_naive_forward(family_checkpoint):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    run = _run(model, tok, CLEAN)
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hooks=["post_block", "mlp_out", "attn_head"],
        heads=[0],
        positions=[0, 1, 2, 5, -1],
        window=3,
        max_batch_tokens=32,
    )
    outcome = run_sweep(model, spec)
    grader = reference_grader(model, spec.metric, run.token_ids, spec.corrupt_ids)
    assert outcome.answer == grader.answer
    n = model.cfg.num_layers
    for hook in spec.hooks:
        head = 0 if hook == "attn_head" else None
        for i, layer in enumerate(spec.layers):
            for j, pos in enumerate(spec.positions):
                window = window_layers(layer, 3, n)
                source = _window_source(run, hook, window, pos, head)
                expected = naive_cell(
                    model, spec.corrupt_ids, hook, layer, pos, source, grader, head=head
                )
                value = outcome.grids[hook][i][j]
                value = value if head is None else value[0]
                assert value == pytest.approx(expected, abs=TOL), (hook, layer, pos)


def test_noise_cells_are_sample_means_of_naive_forwards(family_checkpoint):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    run = _run(model, tok, CLEAN)
    noise = Noise(positions=[1, 2], scale=3.0, samples=2, seed=7)
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CLEAN,
        source=run,
        hooks=["post_block", "attn_out"],
        positions=[0, 1, 2, 3, -1],
        window=2,
        metric="logprob",
    )
    outcome = run_noised(model, spec, noise)
    grader = reference_grader(model, "logprob", run.token_ids, run.token_ids)
    assert outcome.answer == grader.answer
    n = model.cfg.num_layers
    # σ from the checkpoint's embedding weights (times Gemma's √hidden), not the package's
    sigma = reference_sigma(family_checkpoint)
    width = model.cfg.hidden_size
    samples = [
        reference_noise(sigma, width, noise.positions, noise.scale, noise.seed, s)
        for s in range(noise.samples)
    ]
    for hook in spec.hooks:
        for i, layer in enumerate(spec.layers):
            for j, pos in enumerate(spec.positions):
                source = _window_source(run, hook, window_layers(layer, 2, n), pos, None)
                each = [
                    naive_cell(model, spec.corrupt_ids, hook, layer, pos, source, grader, noise=z)
                    for z in samples
                ]
                mean, stderr = mean_and_stderr(each)
                assert outcome.grids[hook][i][j] == pytest.approx(mean, abs=TOL)
                assert outcome.stderr[hook][i][j] == pytest.approx(stderr, abs=TOL)
    # the corrupt baseline is the mean over samples of the noised forward
    corrupt = [
        naive_cell(model, spec.corrupt_ids, "post_block", 0, 0, {}, grader, noise=z)
        for z in samples
    ]
    assert outcome.corrupt == pytest.approx(mean_and_stderr(corrupt)[0], abs=TOL)
    assert outcome.corrupt_stderr == pytest.approx(mean_and_stderr(corrupt)[1], abs=TOL)


def test_the_standard_error_is_the_sample_std_over_root_n():
    """Hard-coded from numpy: ``np.std(x, ddof=1) / sqrt(n)``, the mean's standard error."""
    from patchserve.engine.noise import mean_stderr

    assert mean_stderr([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, 0.8819171036881969), rel=1e-12)
    assert mean_stderr([0.5, -0.5]) == pytest.approx((0.0, 0.5), rel=1e-12)
    assert mean_stderr([3.0]) == (3.0, 0.0)


def test_noise_is_deterministic_for_a_seed_and_differs_across_seeds(family_checkpoint):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    run = _run(model, tok, CLEAN)
    spec, _ = prepare_sweep(model, tok, prompt=CLEAN, source=run, hook="post_block")
    grids = [
        run_noised(model, spec, Noise(positions=[1, 2], samples=2, seed=seed)).grids
        for seed in (0, 0, 1)
    ]
    assert grids[0] == grids[1]  # bitwise: floats compared with ==
    assert grids[0] != grids[2]
    a = noise_tensor(model, Noise([1, 2], seed=4), 1)
    assert torch.equal(a, noise_tensor(model, Noise([1, 2], seed=5), 0))
