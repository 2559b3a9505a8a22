"""Metric values against numbers computed here, by hand or with plain numpy sums
(``wire/metrics.py`` and ``engine/metrics.py``; issue 26's mutation check)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from patchserve.engine.metrics import Grader, raw_score
from patchserve.errors import InvalidArgument
from patchserve.wire.metrics import (
    DEGENERATE,
    Grading,
    check_metric,
    kl_divergence,
    log_softmax,
    lower_is_better,
    recovered_raw,
)

#: Two rows of four logits; the top logit is never 0, so a dropped max-shift shows.
ROWS = [[2.0, 0.5, -1.0, 0.25], [0.5, 3.0, 1.0, -2.0]]


def _logsoftmax(row: list[float]) -> list[float]:
    """By the definition: x_i − log Σ_j exp(x_j), one float at a time."""
    total = math.log(math.fsum(math.exp(x) for x in row))
    return [x - total for x in row]


def _kl(p_logits: list[float], q_logits: list[float]) -> float:
    p, q = _logsoftmax(p_logits), _logsoftmax(q_logits)
    return math.fsum(math.exp(a) * (a - b) for a, b in zip(p, q, strict=True))


def test_check_metric_answers_the_metric_and_refuses_others():
    for metric in ("logprob", "prob", "logit_diff", "recovered", "kl"):
        assert check_metric(metric) == metric
    with pytest.raises(InvalidArgument) as info:
        check_metric("accuracy")
    assert info.value.param == "metric"


def test_only_kl_is_lower_is_better():
    assert lower_is_better("kl")
    assert not any(lower_is_better(m) for m in ("logprob", "prob", "logit_diff", "recovered"))


def test_log_softmax_rows_and_a_single_vector():
    out = log_softmax(np.array(ROWS))
    assert out.shape == (2, 4)
    for row, got in zip(ROWS, out, strict=True):
        assert got.tolist() == pytest.approx(_logsoftmax(row), abs=1e-12)
    assert log_softmax(np.array(ROWS[1])).tolist() == pytest.approx(_logsoftmax(ROWS[1]), abs=1e-12)


def test_log_softmax_of_huge_logits_is_finite_and_exact():
    # exp(1000) overflows: only the max-shifted form gets these (worked out by hand).
    got = log_softmax(np.array([1000.0, 999.0, 990.0]))
    norm = math.log(1 + math.exp(-1) + math.exp(-10))
    assert got.tolist() == pytest.approx([-norm, -1 - norm, -10 - norm], abs=1e-12)


def test_log_softmax_keeps_minus_infinity():
    got = log_softmax(np.array([0.0, -np.inf, math.log(3.0)]))
    assert got[1] == -np.inf
    assert got[[0, 2]].tolist() == pytest.approx([math.log(0.25), math.log(0.75)], abs=1e-12)


def test_kl_divergence_by_the_sum_and_zero_probability_clean_tokens():
    p, q = np.array(_logsoftmax(ROWS[0])), np.array([_logsoftmax(ROWS[1])])
    assert kl_divergence(p, q).tolist() == pytest.approx([_kl(ROWS[0], ROWS[1])], abs=1e-12)
    # A clean token of probability 0 adds nothing, even where the row gives it -inf too.
    p = np.array([math.log(0.5), math.log(0.5), -np.inf])
    q = np.array([[math.log(0.25), math.log(0.25), -np.inf], [math.log(0.5), -np.inf, 0.0]])
    got = kl_divergence(p, q)
    assert got[0] == pytest.approx(math.log(2.0), abs=1e-12)
    assert got[1] == np.inf


def test_recovered_raw_takes_the_logit_difference_when_there_is_one():
    assert recovered_raw(-1.5, 0.75).tolist() == 0.75
    assert recovered_raw(-1.5, None).tolist() == -1.5
    assert recovered_raw(np.array([-1.0, -2.0]), None).dtype == np.float64


@pytest.mark.parametrize("metric", ["logprob", "prob", "logit_diff", "recovered"])
def test_grading_score_of_each_metric_by_hand(metric):
    lp, diff = np.array([-0.5, -2.0]), np.array([1.25, -0.75])
    grading = Grading(metric, 0, foil=1, clean_score=2.0, corrupt_score=-1.0)
    expected = {
        "logprob": [-0.5, -2.0],
        "prob": [math.exp(-0.5), math.exp(-2.0)],
        "logit_diff": [1.25, -0.75],
        "recovered": [(1.25 + 1.0) / 3.0, (-0.75 + 1.0) / 3.0],
    }[metric]
    got = grading.score(lp, diff)
    assert got.dtype == np.float64
    assert got.tolist() == pytest.approx(expected, abs=1e-15)


def test_recovered_without_a_foil_normalises_the_answer_logprob():
    grading = Grading("recovered", 0, clean_score=-0.5, corrupt_score=-4.5)
    # a logit difference handed over anyway is ignored without a foil
    got = grading.score(np.array([-0.5, -4.5, -2.5]), np.array([9.0, 9.0, 9.0]))
    assert got.tolist() == pytest.approx([1.0, 0.0, 0.5], abs=1e-15)
    assert grading.raw(np.array([-1.0]), np.array([5.0])).tolist() == [-1.0]
    with_foil = Grading("recovered", 0, foil=3, clean_score=1.0, corrupt_score=0.0)
    assert with_foil.raw(np.array([-1.0]), np.array([5.0])).tolist() == [5.0]


def test_kl_scores_the_kl_it_is_given():
    grading = Grader("kl", 0, clean_logprobs=torch.zeros(4))
    assert Grading.score(grading, None, None, np.array([0.25, 2.0])).tolist() == [0.25, 2.0]


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"metric": "logit_diff"}, "foil_token", "needs a foil"),
        ({"metric": "kl"}, "metric", "clean run"),
        ({"metric": "recovered", "corrupt_score": 0.0}, "clean_baseline", "clean baseline"),
        ({"metric": "recovered", "clean_score": 0.0}, "metric", "corrupt baseline"),
        (
            {"metric": "recovered", "clean_score": 0.0, "corrupt_score": DEGENERATE},
            "metric",
            "zero",
        ),
    ],
)
def test_gradings_that_cannot_be_computed_are_refused(kwargs, param, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        Grading(answer=0, **kwargs)
    assert info.value.param == param


def test_the_degenerate_gap_is_one_billionth():
    assert DEGENERATE == 1e-9
    Grading("recovered", 0, clean_score=0.0, corrupt_score=-2e-9)  # just above: accepted
    Grading("recovered", 0, clean_score=2.5e-9, corrupt_score=0.0)
    with pytest.raises(InvalidArgument):
        Grading("recovered", 0, clean_score=1e-9, corrupt_score=0.0)


# -- engine/metrics.py: the same metrics from torch logits on the device ---------------------

LOGITS = torch.tensor(ROWS)
CLEAN = [1.0, -1.0, 0.5, 2.5]


def test_raw_score_is_the_logit_difference_or_the_answer_logprob():
    assert raw_score(LOGITS, 0, 1).tolist() == [1.5, -2.5]
    assert raw_score(LOGITS, 3, None).tolist() == pytest.approx(
        [_logsoftmax(r)[3] for r in ROWS], abs=1e-12
    )
    assert raw_score(LOGITS, 3, None).dtype == torch.float64


@pytest.mark.parametrize("metric", ["logprob", "prob", "logit_diff", "kl"])
def test_grader_values_by_hand(metric):
    clean = torch.tensor(_logsoftmax(CLEAN), dtype=torch.float64)
    grader = Grader(metric, 2, foil=0, clean_logprobs=clean)
    expected = {
        "logprob": [_logsoftmax(r)[2] for r in ROWS],
        "prob": [math.exp(_logsoftmax(r)[2]) for r in ROWS],
        "logit_diff": [r[2] - r[0] for r in ROWS],
        "kl": [_kl(CLEAN, r) for r in ROWS],
    }[metric]
    got = grader(LOGITS)
    assert got.dtype == torch.float64 and got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_grader_kl_with_zero_probability_clean_tokens():
    clean = torch.tensor(
        [math.log(0.25), -math.inf, math.log(0.75), -math.inf], dtype=torch.float64
    )
    q = [_logsoftmax(r) for r in ROWS]
    expected = [0.25 * (math.log(0.25) - r[0]) + 0.75 * (math.log(0.75) - r[2]) for r in q]
    assert Grader("kl", 1, clean_logprobs=clean)(LOGITS).tolist() == pytest.approx(expected)


@pytest.mark.parametrize("foil", [None, 3])
def test_grader_recovered_with_and_without_a_foil(foil):
    def m(row: list[float]) -> float:
        return row[1] - row[3] if foil is not None else _logsoftmax(row)[1]

    clean, corrupt = m(ROWS[1]) + 1.0, m(ROWS[0]) - 0.5
    grader = Grader("recovered", 1, foil=foil, clean_score=clean, corrupt_score=corrupt)
    expected = [(m(r) - corrupt) / (clean - corrupt) for r in ROWS]
    assert grader(LOGITS).tolist() == pytest.approx(expected, abs=1e-12)


def test_grader_reads_float32_and_half_logits_in_float64():
    logits = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float16)
    exact = [float(x) for x in logits[0].double()]
    assert Grader("logprob", 2)(logits).item() == pytest.approx(_logsoftmax(exact)[2], abs=1e-12)
    assert Grader("logit_diff", 2, foil=0)(logits).item() == exact[2] - exact[0]
