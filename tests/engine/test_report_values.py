"""A sweep's wire body and events (``engine/report.py``) against the outcome they report and
top-k lists sorted here with numpy (issue 26's mutation check)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from checkpoints import build_checkpoint
from models.helpers import loaded, tokenizer
from patchserve.engine.diagnostics import improbable_answer_warning
from patchserve.engine.report import cell_event, start_event, sweep_body, top_logprobs
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import Cell, run_sweep
from patchserve.text.alignment import align
from patchserve.wire.sweep import NoiseSummary

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary Ann and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def model_and_tok(checkpoint_root):
    folder = build_checkpoint("gpt2", checkpoint_root)
    return loaded(folder).model, tokenizer(folder)


@pytest.fixture(scope="module")
def run(model_and_tok):
    model, tok = model_and_tok
    hooks = {h: list(range(model.cfg.num_layers)) for h in ("post_block", "mlp_out")}
    return capture_run(model, "clean", CLEAN, tok.encode(CLEAN).ids, hooks)


def _warned(tok, run):
    """The clean run with last logits that make "is" improbable and " is" likely: the
    improbable-answer diagnostic warns about that answer."""
    (answer,) = tok.encode("is", add_special_tokens=False).ids
    (variant,) = tok.encode(" is", add_special_tokens=False).ids
    logits = run.last_logits.clone()
    logits[variant], logits[answer] = 20.0, -20.0
    return answer, replace(run, last_logits=logits)


def _expected_top(tok, logits: torch.Tensor, k: int) -> list[tuple[int, str, float]]:
    x = logits.double().numpy()
    lp = x - x.max() - np.log(np.exp(x - x.max()).sum())
    order = np.argsort(-lp, kind="stable")[:k]
    return [(int(i), tok.decode([int(i)]), float(lp[i])) for i in order]


def _as_tuples(entries) -> list[tuple[int, str, float]]:
    return [(e.token_id, e.token, e.logprob) for e in entries]


def _sweep(model, tok, run, **kw):
    unpaired = align(tok.encode(CLEAN).ids, tok.encode(CORRUPT).ids).unpaired()
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hooks=["post_block", "mlp_out"],
        positions=[0, 1, unpaired[0], -1],
        **kw,
    )
    return spec, run_sweep(model, spec)


def test_top_logprobs_are_the_k_most_likely_by_numpy(model_and_tok, run):
    _, tok = model_and_tok
    logits = run.last_logits
    for k in (0, 1, 5):
        got = _as_tuples(top_logprobs(tok, logits, k))
        expected = _expected_top(tok, logits, k)
        assert [g[:2] for g in got] == [e[:2] for e in expected]
        assert [g[2] for g in got] == pytest.approx([e[2] for e in expected], abs=1e-9)
    assert len(top_logprobs(tok, logits, 10_000)) == logits.shape[-1]


def test_sweep_body_reports_the_outcome(model_and_tok, run):
    model, tok = model_and_tok
    answer, warned = _warned(tok, run)
    _, outcome = _sweep(model, tok, run, answer_token_id=answer, foil_token_id=7)
    assert outcome.skipped and outcome.alignment is not None  # unequal lengths: unpaired cells
    tokens = tok.token_strings(outcome.corrupt_ids)
    body = sweep_body(
        outcome,
        model_name="tiny",
        tokenizer=tok,
        tokens=tokens,
        source_run=warned,
        hooks_given=True,
        auto_captured=True,
        captured_source_run="clean",
        top_k=3,
        window=3,
    )
    assert body.model == "tiny" and body.hook == "post_block"
    assert body.hooks == ["post_block", "mlp_out"] and body.window == 3
    assert body.grid == outcome.grids["post_block"]
    assert body.answer_token_id == answer and body.answer_token == tok.decode([answer])
    assert body.foil_token_id == 7 and body.foil_token == tok.decode([7])
    assert (body.clean, body.corrupt) == (outcome.clean, outcome.corrupt)
    assert body.tokens == tokens and body.source_run == "clean"
    assert body.auto_captured is True and body.captured_source_run == "clean"
    # the warning of the diagnostic, after the outcome's own
    expected_warning = improbable_answer_warning(tok, warned.last_logits, answer)
    assert body.warnings == [*outcome.warnings, *expected_warning] and expected_warning
    # baselines: the corrupt run's and the clean run's top-k, by numpy
    assert body.baselines.corrupt.value == outcome.corrupt
    got = _as_tuples(body.baselines.corrupt.top_logprobs)
    assert [g[0] for g in got] == [e[0] for e in _expected_top(tok, outcome.corrupt_logits, 3)]
    assert body.baselines.clean is not None and body.baselines.clean.value == outcome.clean
    got = _as_tuples(body.baselines.clean.top_logprobs)
    assert [g[0] for g in got] == [e[0] for e in _expected_top(tok, warned.last_logits, 3)]
    assert got[0][2] == pytest.approx(_expected_top(tok, warned.last_logits, 1)[0][2], abs=1e-9)
    # argmax of each hook, and every hook's grid
    for hook_grid, hook in zip(body.hook_grids or [], ["post_block", "mlp_out"], strict=True):
        assert hook_grid.hook == hook and hook_grid.grid == outcome.grids[hook]
        cell = outcome.argmax[hook]
        assert cell is not None and hook_grid.argmax is not None
        assert (hook_grid.argmax.layer, hook_grid.argmax.position) == (cell.layer, cell.position)
        assert hook_grid.argmax.value == cell.value and hook_grid.stderr is None
    assert body.argmax == body.hook_grids[0].argmax
    # skipped cells and the alignment
    assert [(s.hook, s.layer, s.position, s.reason) for s in body.skipped] == [
        (c.hook, c.layer, c.position, c.skipped) for c in outcome.skipped
    ]
    assert body.alignment is not None
    assert body.alignment.shift == len(run.token_ids) - len(outcome.corrupt_ids)
    assert body.stderr_grid is None and body.noise is None
    timing = body.timing
    stats = outcome.stats
    assert (timing.cells, timing.cells_computed, timing.cells_free) == (
        stats["cells"],
        stats["computed"],
        stats["free"],
    )
    assert timing.seconds == stats["seconds"]
    assert timing.cells_per_second == stats["cells_per_second"]


def test_sweep_body_without_a_source_run_or_hooks(model_and_tok, run):
    model, tok = model_and_tok
    _, outcome = _sweep(model, tok, run, answer_token_id=5)
    body = sweep_body(
        outcome,
        model_name="tiny",
        tokenizer=tok,
        tokens=[],
        source_run=None,
        hooks_given=False,
        auto_captured=False,
        captured_source_run=None,
        top_k=2,
    )
    assert body.hook_grids is None and body.alignment is None and body.source_run is None
    assert body.baselines.clean is None and body.warnings == outcome.warnings
    assert body.foil_token is None and body.foil_token_id is None
    assert len(body.baselines.corrupt.top_logprobs) == 2 and body.window == 1


def test_a_clean_baseline_needs_the_clean_value(model_and_tok, run):
    model, tok = model_and_tok
    _, outcome = _sweep(model, tok, run, answer_token_id=5)
    body = sweep_body(
        replace(outcome, clean=None),
        model_name="tiny",
        tokenizer=tok,
        tokens=[],
        source_run=run,
        hooks_given=False,
        auto_captured=False,
        captured_source_run=None,
        top_k=1,
    )
    assert body.baselines.clean is None


def test_noise_stderr_grids_are_reported_per_hook(model_and_tok, run):
    model, tok = model_and_tok
    _, outcome = _sweep(model, tok, run, answer_token_id=5)
    stderr = {
        h: [[0.5 + i for _ in row] for i, row in enumerate(outcome.grids[h])] for h in outcome.hooks
    }
    noise = NoiseSummary(positions=[1], scale=3.0, sigma=0.3, samples=2, seed=0, corrupt_stderr=0.1)
    body = sweep_body(
        replace(outcome, stderr=stderr),
        model_name="tiny",
        tokenizer=tok,
        tokens=[],
        source_run=run,
        hooks_given=True,
        auto_captured=False,
        captured_source_run=None,
        top_k=1,
        noise=noise,
    )
    assert body.stderr_grid == stderr["post_block"] and body.noise == noise
    assert [g.stderr for g in body.hook_grids or []] == [stderr["post_block"], stderr["mlp_out"]]


def test_argmax_of_an_empty_cell_is_none(model_and_tok, run):
    model, tok = model_and_tok
    _, outcome = _sweep(model, tok, run, answer_token_id=5)
    empty = Cell("post_block", 0, 0, None, value=None)
    body = sweep_body(
        replace(outcome, argmax={"post_block": empty, "mlp_out": None}),
        model_name="tiny",
        tokenizer=tok,
        tokens=[],
        source_run=None,
        hooks_given=True,
        auto_captured=False,
        captured_source_run=None,
        top_k=1,
    )
    assert body.argmax is None and all(g.argmax is None for g in body.hook_grids or [])


def test_cell_events_carry_the_cell_and_its_kind_only_off_the_exact_method():
    cell = Cell("attn_head", 2, 4, 1, value=0.25, stderr=0.5, kind="estimate")
    exact = cell_event(cell, 3, 10)
    assert (exact.hook, exact.layer, exact.position, exact.head) == ("attn_head", 2, 4, 1)
    assert (exact.value, exact.stderr, exact.error, exact.done, exact.total) == (
        0.25,
        0.5,
        None,
        3,
        10,
    )
    assert exact.kind is None
    assert cell_event(cell, 3, 10, method="attribution").kind == "estimate"
    failed = cell_event(Cell("mlp_out", 0, 1, None, error="boom"), 1, 2)
    assert failed.error == "boom" and failed.value is None


def test_start_event_lists_the_sweep(model_and_tok, run):
    model, tok = model_and_tok
    spec, _ = _sweep(model, tok, run, answer_token_id=5)
    event = start_event(spec, ["a", "b"], auto_captured=True, captured_source_run="x")
    assert event.hook == "post_block" and event.hooks == ["post_block", "mlp_out"]
    assert (event.layers, event.positions) == (spec.layers, spec.positions)
    assert event.heads is None and event.total == spec.num_cells == 2 * 4 * model.cfg.num_layers
    assert event.metric == "logprob" and event.tokens == ["a", "b"]
    assert event.auto_captured is True and event.captured_source_run == "x"
    heads = replace(spec, hooks=["attn_head"], heads=[0, 2])
    assert start_event(heads, [], auto_captured=False, captured_source_run=None).heads == [0, 2]
