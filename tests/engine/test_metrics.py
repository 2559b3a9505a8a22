"""Metric definitions (SPEC §1) and the recovered-metric guard rails."""

from __future__ import annotations

import math

import pytest
import torch

from models.helpers import loaded, tokenizer
from patchserve.engine.errors import InvalidArgument
from patchserve.engine.metrics import Grader, raw_score
from patchserve.engine.runs import capture_run
from patchserve.engine.study import prepare_sweep
from patchserve.engine.sweep import run_sweep

LOGITS = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 3.0, 1.0, -2.0]])


def test_logprob_prob_and_logit_diff():
    lp = torch.log_softmax(LOGITS.double(), -1)
    assert torch.allclose(Grader("logprob", 1)(LOGITS), lp[:, 1])
    assert torch.allclose(Grader("prob", 1)(LOGITS), lp[:, 1].exp())
    assert Grader("logit_diff", 0, foil=1)(LOGITS).tolist() == [1.5, -3.0]


def test_recovered_is_normalised_between_corrupt_and_clean():
    clean, corrupt = LOGITS[:1], LOGITS[1:]
    m_clean = float(raw_score(clean, 0, 1)[0])
    m_corrupt = float(raw_score(corrupt, 0, 1)[0])
    g = Grader("recovered", 0, foil=1, clean_score=m_clean, corrupt_score=m_corrupt)
    assert g(clean).item() == pytest.approx(1.0)
    assert g(corrupt).item() == pytest.approx(0.0)
    halfway = (clean + corrupt) / 2
    assert g(halfway).item() == pytest.approx(0.5)
    # Without a foil, m is log p(answer).
    g = Grader("recovered", 0, clean_score=-0.1, corrupt_score=-2.1)
    value = g(clean).item()
    assert value == pytest.approx((math.log(torch.softmax(clean, -1)[0, 0].item()) + 2.1) / 2.0)


def test_kl_is_zero_for_the_clean_distribution_and_positive_otherwise():
    ref = torch.log_softmax(LOGITS[0].double(), -1)
    g = Grader("kl", 0, clean_logprobs=ref)
    assert g(LOGITS[:1]).item() == pytest.approx(0.0, abs=1e-12)
    p, q = ref.exp(), torch.softmax(LOGITS[1].double(), -1)
    assert g(LOGITS[1:]).item() == pytest.approx(float((p * (p.log() - q.log())).sum()))


def test_recovered_rejects_equal_clean_and_corrupt():
    with pytest.raises(InvalidArgument, match="divide by zero"):
        Grader("recovered", 0, clean_score=-1.0, corrupt_score=-1.0 + 1e-12)


def test_recovered_without_a_clean_baseline_is_an_error():
    with pytest.raises(InvalidArgument, match="clean baseline"):
        Grader("recovered", 0, corrupt_score=-1.0)


def test_logit_diff_needs_a_foil():
    with pytest.raises(InvalidArgument, match="foil"):
        Grader("logit_diff", 0)


def test_unknown_metric():
    with pytest.raises(InvalidArgument, match="unknown metric"):
        Grader("accuracy", 0)


CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"


def test_recovered_is_one_at_the_last_layer_and_position(family_checkpoint):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    n = model.cfg.num_layers
    ids = tok.encode(CLEAN).ids
    run = capture_run(model, "clean", CLEAN, ids, {"post_block": list(range(n))})
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, metric="recovered")
    outcome = run_sweep(model, spec)
    assert outcome.grids["post_block"][-1][-1] == pytest.approx(1.0, abs=1e-6)
    # 'recovered' reports the raw baselines (log p(answer)), as the seed does.
    assert outcome.clean == float(raw_score(run.last_logits[None], outcome.answer, None)[0])
    corrupt_lp = raw_score(outcome.corrupt_logits[None].double(), outcome.answer, None)
    assert outcome.corrupt == pytest.approx(float(corrupt_lp[0]), abs=1e-9)
    # Positions before the first differing token patch identical activations: exactly 0.
    first_diff = next(
        i for i, (a, b) in enumerate(zip(ids, spec.corrupt_ids, strict=True)) if a != b
    )
    for row in outcome.grids["post_block"]:
        assert all(v == 0.0 for v in row[:first_diff])
    # With a foil the same holds for the logit-difference flavour.
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=run,
        metric="recovered",
        answer_token_id=outcome.answer,
        foil_token_id=(outcome.answer + 1) % 300,
    )
    assert run_sweep(model, spec).grids["post_block"][-1][-1] == pytest.approx(1.0, abs=1e-6)


def test_clean_equal_to_corrupt_is_a_clear_error(family_checkpoint):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    ids = tok.encode(CLEAN).ids
    run = capture_run(model, "clean", CLEAN, ids, {"post_block": [0]})
    spec, _ = prepare_sweep(model, tok, prompt=CLEAN, source=run, metric="recovered", layers=[0])
    with pytest.raises(InvalidArgument, match="score the same"):
        run_sweep(model, spec)
