"""Multi-token answers: lane plans worked out by hand and teacher-forced totals summed here
one log-probability at a time (``engine/continuation.py``; issue 26's mutation check)."""

from __future__ import annotations

import math

import pytest
import torch

from patchserve.engine.continuation import (
    Continuation,
    ContinuationGrader,
    check_multi_token_metric,
    raw_total,
)
from patchserve.engine.errors import InvalidArgument
from patchserve.wire.metrics import Grading


@pytest.mark.parametrize(
    ("answer", "foil", "tails", "lanes"),
    [
        ([5], None, [[]], (0, 0)),
        ([5, 6, 7], None, [[5, 6]], (0, 0)),
        ([5], [6], [[]], (0, 0)),  # one-token answer and foil: one lane, no tail
        ([5, 6, 7], [5, 8], [[5, 6]], (0, 0)),  # the foil's context [5] is in the answer's tail
        ([5, 6, 7], [5, 6, 9], [[5, 6]], (0, 0)),
        ([5, 6, 7], [9], [[5, 6]], (0, 0)),  # a one-token foil needs no context
        ([5, 6], [5, 6, 7, 8], [[5, 6, 7]], (0, 0)),  # the answer's context is in the foil's
        ([5], [6, 7], [[6]], (0, 0)),
        ([5, 6, 7], [5, 9, 8], [[5, 6], [5, 9]], (0, 1)),  # contexts differ: two lanes
        ([5, 6], [7, 8], [[5], [7]], (0, 1)),
        ([5, 6], [5, 6, 8, 9], [[5, 6, 8]], (0, 0)),
        ([5, 6, 7], [5, 6, 8, 9], [[5, 6, 8]], (0, 0)),  # a 2-token context in the foil's
    ],
)
def test_lane_plans_by_hand(answer, foil, tails, lanes):
    plan = Continuation.plan(answer, foil)
    assert plan.tails == tails
    assert (plan.answer_lane, plan.foil_lane) == lanes
    assert (plan.answer, plan.foil) == (answer, foil)


@pytest.mark.parametrize(
    ("answer", "foil", "multi"),
    [([5], None, False), ([5], [6], False), ([5, 6], None, True), ([5], [6, 7], True)],
)
def test_multi_is_any_sequence_longer_than_one(answer, foil, multi):
    assert Continuation.plan(answer, foil).multi is multi


def _logits(rows: int, positions: int, vocab: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, positions, vocab, generator=torch.Generator().manual_seed(seed))


def _by_hand(logits: torch.Tensor, seq: list[int]) -> list[float]:
    """Σ_i log p(seq_i) at read position i, one float at a time."""
    out = []
    for row in logits.double().tolist():
        total = 0.0
        for i, token in enumerate(seq):
            norm = math.log(math.fsum(math.exp(x) for x in row[i]))
            total += row[i][token] - norm
        out.append(total)
    return out


def test_totals_of_one_lane_sum_the_teacher_forced_logprobs():
    plan = Continuation.plan([1, 4, 2], [1, 3])
    lane = _logits(2, 3)
    answer, foil = plan.totals([lane])
    assert answer.dtype == torch.float64
    assert answer.tolist() == pytest.approx(_by_hand(lane, [1, 4, 2]), abs=1e-12)
    assert foil is not None
    assert foil.tolist() == pytest.approx(_by_hand(lane, [1, 3]), abs=1e-12)
    diff = [a - f for a, f in zip(_by_hand(lane, [1, 4, 2]), _by_hand(lane, [1, 3]), strict=True)]
    assert raw_total(plan, [lane]).tolist() == pytest.approx(diff, abs=1e-12)


def test_totals_of_two_lanes_read_each_from_its_own_lane():
    plan = Continuation.plan([1, 4], [2, 5, 3])
    assert plan.tails == [[1], [2, 5]]
    answer_lane, foil_lane = _logits(3, 2, seed=1), _logits(3, 3, seed=2)
    answer, foil = plan.totals([answer_lane, foil_lane])
    assert answer.tolist() == pytest.approx(_by_hand(answer_lane, [1, 4]), abs=1e-12)
    assert foil is not None
    assert foil.tolist() == pytest.approx(_by_hand(foil_lane, [2, 5, 3]), abs=1e-12)


def test_without_a_foil_the_raw_total_is_the_answer_total():
    plan = Continuation.plan([3, 0], None)
    lane = _logits(2, 2, seed=3)
    answer, foil = plan.totals([lane])
    assert foil is None and answer.tolist() == pytest.approx(_by_hand(lane, [3, 0]), abs=1e-12)
    assert raw_total(plan, [lane]).tolist() == pytest.approx(_by_hand(lane, [3, 0]), abs=1e-12)


def test_one_token_logit_difference_is_the_difference_of_logits():
    plan = Continuation.plan([2], [5])
    lane = _logits(2, 1, seed=4)
    expected = (lane[:, 0, 2].double() - lane[:, 0, 5].double()).tolist()
    assert raw_total(plan, [lane]).tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("metric", ["logprob", "prob", "logit_diff", "recovered"])
def test_continuation_grader_values_by_hand(metric):
    plan = Continuation.plan([1, 4], [1, 3])
    lane = _logits(2, 2, seed=5)
    a, f = _by_hand(lane, [1, 4]), _by_hand(lane, [1, 3])
    grading = Grading(metric, 1, foil=1, clean_score=1.5, corrupt_score=-0.5)
    expected = {
        "logprob": a,
        "prob": [math.exp(x) for x in a],
        "logit_diff": [x - y for x, y in zip(a, f, strict=True)],
        "recovered": [(x - y + 0.5) / 2.0 for x, y in zip(a, f, strict=True)],
    }[metric]
    got = ContinuationGrader(grading, plan)([lane])
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_recovered_without_a_foil_normalises_the_answer_total():
    plan = Continuation.plan([1, 4], None)
    lane = _logits(2, 2, seed=6)
    a = _by_hand(lane, [1, 4])
    grading = Grading("recovered", 1, clean_score=0.0, corrupt_score=-8.0)
    got = ContinuationGrader(grading, plan)([lane])
    assert got.tolist() == pytest.approx([(x + 8.0) / 8.0 for x in a], abs=1e-12)


def test_kl_is_refused_for_multi_token_answers_only():
    with pytest.raises(InvalidArgument, match="kl") as info:
        check_multi_token_metric("kl", Continuation.plan([1, 2], None))
    assert info.value.param == "metric"
    with pytest.raises(InvalidArgument):
        check_multi_token_metric("kl", Continuation.plan([1], [2, 3]))
    check_multi_token_metric("kl", Continuation.plan([1], [2]))
    check_multi_token_metric("logprob", Continuation.plan([1, 2], None))
