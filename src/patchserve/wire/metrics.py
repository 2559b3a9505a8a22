"""What each metric means (docs/api.md §1 *Metrics*), in numpy: the one definition the server's
engine and the client's per-cell cross-check both grade with.

A side hands :meth:`Grading.score` the raw quantities of its rows — log
p(answer), logit(answer) − logit(foil), KL(clean ‖ row) — computed where its
logits live (the engine on the model's device, the client from the
log-probabilities the server returned); everything after that (probability,
the ``recovered`` normalisation, the checks, which direction is "more
restored") is here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from patchserve.errors import InvalidArgument
from patchserve.wire.hooks import LOWER_IS_BETTER, METRICS

#: |m_clean − m_corrupt| at or below this makes ``recovered`` a division by zero: a 400.
DEGENERATE = 1e-9


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidArgument(
            f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}", "metric"
        )
    return metric


def lower_is_better(metric: str) -> bool:
    """Whether a lower value means more restored (``kl``)."""
    return metric in LOWER_IS_BETTER


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (``-inf`` logits stay ``-inf``)."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x, axis=-1, keepdims=True)
    out: np.ndarray = x - top - np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))
    return out


def kl_divergence(clean_logprobs: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(clean ‖ row) of each row of ``logprobs`` ``[n, vocab]``; zero-probability clean
    tokens contribute nothing."""
    p = np.asarray(clean_logprobs, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        terms = np.exp(p) * (p - np.asarray(logprobs, dtype=np.float64))
    kl: np.ndarray = np.where(np.isneginf(p), 0.0, terms).sum(-1)
    return kl


def recovered_raw(answer_logprob: Any, logit_diff: Any) -> np.ndarray:
    """``m`` of ``recovered`` (before normalising): the logit difference when there is a foil
    (``logit_diff`` given), else log p(answer)."""
    chosen = logit_diff if logit_diff is not None else answer_logprob
    assert chosen is not None
    return np.asarray(chosen, dtype=np.float64)


@dataclass
class Grading:
    """One metric with its answer, foil and baselines; validated on construction."""

    metric: str
    answer: int
    foil: int | None = None
    clean_score: float | None = None  # m_clean, for recovered
    corrupt_score: float | None = None  # m_corrupt, for recovered

    def __post_init__(self) -> None:
        check_metric(self.metric)
        if self.metric == "logit_diff" and self.foil is None:
            raise InvalidArgument("metric 'logit_diff' needs a foil token", "foil_token")
        if self.metric == "kl" and not self.has_clean_distribution():
            raise InvalidArgument("metric 'kl' needs a clean run to compare against", "metric")
        if self.metric == "recovered":
            if self.clean_score is None:
                raise InvalidArgument(
                    "metric 'recovered' needs a clean baseline: give clean_prompt, "
                    "a source_run captured with logits, or clean_baseline",
                    "clean_baseline",
                )
            if self.corrupt_score is None:
                raise InvalidArgument("metric 'recovered' needs the corrupt baseline", "metric")
            if abs(self.clean_score - self.corrupt_score) <= DEGENERATE:
                raise InvalidArgument(
                    "clean and corrupt runs score the same "
                    f"({self.clean_score:.6g}); 'recovered' would divide by zero",
                    "metric",
                )

    def has_clean_distribution(self) -> bool:
        """Whether ``kl`` can be graded (a side with the clean distribution says so)."""
        return False

    def raw(self, answer_logprob: np.ndarray | None, logit_diff: np.ndarray | None) -> np.ndarray:
        """``m`` of ``recovered``: the logit difference with a foil, else log p(answer)."""
        return recovered_raw(answer_logprob, logit_diff if self.foil is not None else None)

    def score(
        self,
        answer_logprob: np.ndarray | None,
        logit_diff: np.ndarray | None = None,
        kl: np.ndarray | None = None,
    ) -> np.ndarray:
        """``[n]`` float64 metric values from the rows' raw quantities (each side passes
        those the metric needs: log p(answer), the logit difference, the KL)."""
        if self.metric in ("logprob", "prob"):
            assert answer_logprob is not None
            values = np.asarray(answer_logprob, dtype=np.float64)
            return values if self.metric == "logprob" else np.exp(values)
        if self.metric == "logit_diff":
            assert logit_diff is not None
            return np.asarray(logit_diff, dtype=np.float64)
        if self.metric == "recovered":
            assert self.clean_score is not None and self.corrupt_score is not None
            m = self.raw(answer_logprob, logit_diff)
            return (m - self.corrupt_score) / (self.clean_score - self.corrupt_score)
        assert kl is not None
        return np.asarray(kl, dtype=np.float64)
