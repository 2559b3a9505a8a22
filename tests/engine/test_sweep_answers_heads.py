"""Multi-token answers and (layer, head) sweeps equal a naive per-cell reference forward."""

from __future__ import annotations

import pytest
import torch

from engine.oracles import naive_total
from models.helpers import loaded, tokenizer
from patchserve.engine.errors import InvalidArgument
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep
from patchserve.models import HOOKS
from patchserve.text.alignment import align

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, Mary gave a drink to"
ANSWER = [5, 9, 13]
TOL = 1e-4


def _study(folder):
    model, tok = loaded(folder).model, tokenizer(folder)
    ids = tok.encode(CLEAN).ids
    layers = list(range(model.cfg.num_layers))
    run = capture_run(model, "clean", CLEAN, ids, {h: layers for h in HOOKS})
    return model, tok, run


def _writes(run, spec, hook, layer, positions, head):
    """The reference writes of one cell: the clean value at each (aligned) position."""
    alignment, out = align(run.token_ids, spec.corrupt_ids), []
    for p in positions:
        src = alignment.source_position(p)
        if src is None:
            continue  # no clean partner: left unpatched (and said so in a warning)
        row = run.row(hook, layer, src)
        out.append((hook, layer, p, head, row if head is None else row[head]))
    return out


def _totals(model, spec, writes, answer, foil):
    a = naive_total(model, spec.corrupt_ids, answer, writes)
    return a if foil is None else a - naive_total(model, spec.corrupt_ids, foil, writes)


@pytest.mark.parametrize("foil", [None, [5, 9, 7], [11, 3]], ids=["none", "one-lane", "two-lanes"])
def test_multi_token_cells_match_naive_totals(family_checkpoint, foil):
    model, tok, run = _study(family_checkpoint)
    n = model.cfg.num_layers
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hooks=["post_block", "attn_head", "mlp_out"],
        layers=[0, n - 1],
        positions=[0, 1, -1],
        heads=[0],
        answer_token_id=ANSWER,
        foil_token_id=foil,
        metric="logprob" if foil is None else "logit_diff",
        max_batch_tokens=16,
    )
    outcome = run_sweep(model, spec)
    assert outcome.answer_ids == ANSWER and outcome.foil_ids == foil
    assert outcome.stats["computed"] > 0 and outcome.noise_floor < TOL
    checked = 0
    for hook in spec.hooks:
        for i, layer in enumerate(spec.layers):
            for j, pos in enumerate(spec.positions):
                head = 0 if hook == "attn_head" else None
                value = outcome.grids[hook][i][j]
                value = value if head is None else value[0]
                writes = _writes(run, spec, hook, layer, [pos], head)
                expected = _totals(model, spec, writes, ANSWER, foil)
                assert value == pytest.approx(expected, abs=TOL), (hook, layer, pos)
                checked += 1
    assert checked == 3 * 2 * 3
    assert outcome.corrupt == pytest.approx(_totals(model, spec, [], ANSWER, foil), abs=TOL)


def test_recovered_normalises_the_totals(family_checkpoint):
    model, tok, run = _study(family_checkpoint)
    foil = [11, 3]
    kwargs = dict(prompt=CORRUPT, source=run, hook="post_block", layers=[0])
    kwargs.update(answer_token_id=ANSWER, foil_token_id=foil)
    raw, _ = prepare_sweep(model, tok, metric="logit_diff", **kwargs)
    rec, _ = prepare_sweep(model, tok, metric="recovered", **kwargs)
    a, b = run_sweep(model, raw), run_sweep(model, rec)
    clean = naive_total(model, run.token_ids, ANSWER, []) - naive_total(
        model, run.token_ids, foil, []
    )
    assert b.clean == pytest.approx(clean, abs=TOL) and a.clean == pytest.approx(clean, abs=TOL)
    ga, gb = a.grids["post_block"][0], b.grids["post_block"][0]
    pairs = [(x, y) for x, y in zip(ga, gb, strict=True) if x is not None]
    assert pairs
    for x, y in pairs:
        assert y == pytest.approx((x - a.corrupt) / (a.clean - a.corrupt), abs=TOL)


def test_answer_score_is_the_sum_of_plain_per_step_logprobs(family_checkpoint):
    """The clean baseline, from plain forwards of the growing sequence, one step each."""
    model, tok, run = _study(family_checkpoint)
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hook="post_block",
        layers=[0],
        answer_token_id=ANSWER,
    )
    outcome = run_sweep(model, spec)
    for ids, value in ((run.token_ids, outcome.clean), (spec.corrupt_ids, outcome.corrupt)):
        total = 0.0
        for i, token in enumerate(ANSWER):
            with torch.inference_mode():
                logits = model(torch.tensor([ids + ANSWER[:i]]))[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[token])
        assert value == pytest.approx(total, abs=TOL)


def test_one_token_answers_keep_the_one_token_path(family_checkpoint):
    """A list of one id is the same sweep as the id, bit for bit."""
    model, tok, run = _study(family_checkpoint)
    kwargs = dict(prompt=CORRUPT, source=run, hooks=["post_block", "attn_out"], layers=[0, 1])
    a = run_sweep(model, prepare_sweep(model, tok, answer_token_id=5, **kwargs)[0])
    b = run_sweep(model, prepare_sweep(model, tok, answer_token_id=[5], **kwargs)[0])
    assert a.grids == b.grids and a.corrupt == b.corrupt


def test_a_continuation_keeps_the_free_cells_free(family_checkpoint):
    """The prompt's activations under an appended answer are bit for bit the prompt's own,
    so cells that write the corrupt value back cost nothing, as with one token."""
    model, tok, run = _study(family_checkpoint)
    kwargs = dict(prompt=CORRUPT, source=run, hooks=["post_block", "attn_head"], heads=[0])
    a = run_sweep(model, prepare_sweep(model, tok, answer_token_id=5, **kwargs)[0])
    b = run_sweep(model, prepare_sweep(model, tok, answer_token_id=ANSWER, **kwargs)[0])
    assert a.stats["free"] == b.stats["free"] > 0


@pytest.mark.parametrize("answer", [None, ANSWER], ids=["one-token", "multi-token"])
def test_head_sweep_over_all_positions_matches_naive(family_checkpoint, answer):
    model, tok, run = _study(family_checkpoint)
    cfg = model.cfg
    heads = [0, cfg.num_heads - 1]
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        hook="attn_head",
        heads=heads,
        positions=[1, 2, -3, -1],
        per_position=False,
        answer_token_id=answer if answer is not None else 5,
        foil_token_id=[7],
        metric="logit_diff",
        max_batch_tokens=32,
    )
    assert spec.num_cells == cfg.num_layers * len(heads)
    outcome = run_sweep(model, spec)
    grid = outcome.grids["attn_head"]
    assert len(grid) == cfg.num_layers and all(len(row) == len(heads) for row in grid)
    full = answer if answer is not None else [5]
    for i, layer in enumerate(spec.layers):
        for k, head in enumerate(heads):
            writes = _writes(run, spec, "attn_head", layer, spec.positions, head)
            expected = _totals(model, spec, writes, full, [7])
            assert grid[i][k] == pytest.approx(expected, abs=TOL), (layer, head)
    unpaired = set(spec.positions) & set(align(run.token_ids, spec.corrupt_ids).unpaired())
    assert bool(unpaired) == any("left unpatched" in w for w in outcome.warnings)
    best = outcome.argmax["attn_head"]
    assert best is not None and best.position is None
    assert best.value == max(v for row in grid for v in row)


def test_bad_answers_and_head_options_are_refused(family_checkpoint):
    model, tok, run = _study(family_checkpoint)
    base = dict(prompt=CORRUPT, source=run)
    cases = [
        (dict(answer_token_id=[]), "answer_token_id"),
        (dict(answer_token=""), "answer_token"),
        (dict(answer_token_id=[5, model.cfg.vocab_size]), "answer_token_id"),
        (dict(answer_token_id=ANSWER, metric="kl"), "metric"),
        (dict(answer_token_id=ANSWER, foil_token_id=list(ANSWER)), "foil_token"),
        (dict(hook="post_block", per_position=False), "per_position"),
    ]
    for kwargs, param in cases:
        with pytest.raises(InvalidArgument) as info:
            prepare_sweep(model, tok, **base, **kwargs)
        assert info.value.param == param, kwargs
