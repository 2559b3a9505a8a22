"""Grading the next-token distribution of a cell (SPEC §1 *Metrics*).

All arithmetic is in float64 on the logits of the last prompt position.
``recovered`` is ``(m_cell - m_corrupt) / (m_clean - m_corrupt)`` with ``m``
the logit difference when a foil is given, else the answer's log-probability;
``kl`` is KL(clean ‖ cell) over the full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchserve.engine.errors import RequestError

METRICS: tuple[str, ...] = ("logprob", "prob", "logit_diff", "recovered", "kl")
DEGENERATE = 1e-9


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise RequestError(
            f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}", "metric"
        )
    return metric


def raw_score(logits: torch.Tensor, answer: int, foil: int | None) -> torch.Tensor:
    """``m`` of ``recovered``: logit difference with a foil, else log p(answer). ``[n]``."""
    logits = logits.double()
    if foil is not None:
        return logits[:, answer] - logits[:, foil]
    return torch.log_softmax(logits, dim=-1)[:, answer]


@dataclass
class Grader:
    """Scores rows of last-position logits ``[n, vocab]`` under one metric."""

    metric: str
    answer: int
    foil: int | None = None
    clean_logprobs: torch.Tensor | None = None  # [vocab] float64, for kl
    clean_score: float | None = None  # m_clean, for recovered
    corrupt_score: float | None = None  # m_corrupt, for recovered

    def __post_init__(self) -> None:
        check_metric(self.metric)
        if self.metric == "logit_diff" and self.foil is None:
            raise RequestError("metric 'logit_diff' needs a foil token", "foil_token")
        if self.metric == "kl" and self.clean_logprobs is None:
            raise RequestError("metric 'kl' needs a clean run to compare against", "metric")
        if self.metric == "recovered":
            if self.clean_score is None:
                raise RequestError(
                    "metric 'recovered' needs a clean baseline: give clean_prompt, "
                    "a source_run captured with logits, or clean_baseline",
                    "clean_baseline",
                )
            if self.corrupt_score is None:
                raise RequestError("metric 'recovered' needs the corrupt baseline", "metric")
            if abs(self.clean_score - self.corrupt_score) <= DEGENERATE:
                raise RequestError(
                    "clean and corrupt runs score the same "
                    f"({self.clean_score:.6g}); 'recovered' would divide by zero",
                    "metric",
                )

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``[n]`` float64 metric values of ``[n, vocab]`` logits."""
        logits = logits.double()
        if self.metric == "logprob":
            return torch.log_softmax(logits, dim=-1)[:, self.answer]
        if self.metric == "prob":
            return torch.softmax(logits, dim=-1)[:, self.answer]
        if self.metric == "logit_diff":
            assert self.foil is not None
            return logits[:, self.answer] - logits[:, self.foil]
        if self.metric == "recovered":
            assert self.clean_score is not None and self.corrupt_score is not None
            m = raw_score(logits, self.answer, self.foil)
            return (m - self.corrupt_score) / (self.clean_score - self.corrupt_score)
        assert self.clean_logprobs is not None
        p_clean = self.clean_logprobs.to(logits.device)
        logp = torch.log_softmax(logits, dim=-1)
        terms = torch.exp(p_clean) * (p_clean - logp)
        return torch.where(torch.isinf(p_clean), torch.zeros_like(terms), terms).sum(-1)
