"""Grading last-position logits on the model's device (docs/api.md §1 *Metrics*).

The metrics themselves are defined once, in :mod:`patchserve.wire.metrics`
(numpy, shared with the client); this module extracts their raw quantities
— log p(answer), the logit difference, KL(clean ‖ cell) — from ``[n, vocab]``
logits in float64 torch, so the full distributions never leave the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from patchserve.wire.hooks import METRICS
from patchserve.wire.metrics import DEGENERATE, Grading, check_metric

__all__ = ["DEGENERATE", "METRICS", "Grader", "check_metric", "raw_score"]


def raw_score(logits: torch.Tensor, answer: int, foil: int | None) -> torch.Tensor:
    """``m`` of ``recovered``: logit difference with a foil, else log p(answer). ``[n]``."""
    logits = logits.double()
    if foil is not None:
        return logits[:, answer] - logits[:, foil]
    return torch.log_softmax(logits, dim=-1)[:, answer]


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()


@dataclass
class Grader(Grading):
    """Scores rows of last-position logits ``[n, vocab]`` under one metric."""

    clean_logprobs: torch.Tensor | None = None  # [vocab] float64, for kl

    def has_clean_distribution(self) -> bool:
        return self.clean_logprobs is not None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``[n]`` float64 metric values of ``[n, vocab]`` logits (on the CPU)."""
        logits = logits.double()
        diff = None if self.foil is None else logits[:, self.answer] - logits[:, self.foil]
        answer_logprob = kl = None
        if self.metric in ("logprob", "prob", "kl") or (
            self.metric == "recovered" and diff is None
        ):
            logp = torch.log_softmax(logits, dim=-1)  # the full vocabulary: only when needed
            answer_logprob = logp[:, self.answer]
            if self.metric == "kl":
                assert self.clean_logprobs is not None
                p_clean = self.clean_logprobs.to(logits.device)
                terms = torch.exp(p_clean) * (p_clean - logp)
                kl = torch.where(torch.isinf(p_clean), torch.zeros_like(terms), terms).sum(-1)
        values = self.score(
            None if answer_logprob is None else _numpy(answer_logprob),
            None if diff is None else _numpy(diff),
            None if kl is None else _numpy(kl),
        )
        return torch.from_numpy(values)
