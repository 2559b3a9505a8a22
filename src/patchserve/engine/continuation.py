"""Multi-token answers: grading a continuation by its teacher-forced total log-probability.

An answer ``A = a0 … a(k-1)`` is scored as ``Σ log p(a_i | prompt, a_<i)``;
with a foil ``F``, ``logit_diff`` (and ``recovered``'s ``m``) is the
difference of the two totals — for one-token answers exactly the logit
difference, since the normaliser cancels. ``kl`` grades the next-token
distribution, which does not depend on the answer, so a multi-token answer
with ``kl`` is refused (a 400), never silently truncated.

The sweep computes the totals in its resumed passes: a *lane* appends a tail
of tokens to the prompt, and logits are read at the last prompt position and
at every appended position. One lane serves a continuation ``C`` when its tail
starts with ``C[:-1]`` (the context each of ``C``'s tokens is predicted from);
the answer's lane serves the foil too when the foil's context is a prefix of
the answer (or the other way round), else the foil gets a lane of its own and
every cell runs one row per lane.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchserve.engine.errors import InvalidArgument
from patchserve.wire.metrics import Grading


def _serves(tail: list[int], seq: list[int]) -> bool:
    return tail[: len(seq) - 1] == seq[:-1] and len(tail) >= len(seq) - 1


@dataclass(frozen=True)
class Continuation:
    """The graded token sequences and the lanes (appended tails) that score them."""

    answer: list[int]
    foil: list[int] | None
    tails: list[list[int]]
    answer_lane: int = 0
    foil_lane: int = 0

    @classmethod
    def plan(cls, answer: list[int], foil: list[int] | None) -> Continuation:
        tail = answer[:-1]
        if foil is None or _serves(tail, foil):
            return cls(answer, foil, [tail])
        if _serves(foil[:-1], answer):
            return cls(answer, foil, [foil[:-1]])
        return cls(answer, foil, [tail, foil[:-1]], 0, 1)

    @property
    def multi(self) -> bool:
        """Whether any graded sequence has more than one token (else the one-token path)."""
        return len(self.answer) > 1 or (self.foil is not None and len(self.foil) > 1)

    def totals(self, lane_logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Total log-probabilities ``[n]`` (float64) of the answer and the foil from each
        lane's logits ``[n, len(tail) + 1, vocab]`` (the read positions, in order)."""
        answer = _total(lane_logits[self.answer_lane], self.answer)
        foil = None if self.foil is None else _total(lane_logits[self.foil_lane], self.foil)
        return answer, foil


def _total(logits: torch.Tensor, seq: list[int]) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, : len(seq)].double(), dim=-1)
    index = torch.tensor(seq, device=logits.device)[None, :, None].expand(logp.shape[0], -1, 1)
    return logp.gather(-1, index)[..., 0].sum(-1)


def raw_total(continuation: Continuation, lane_logits: list[torch.Tensor]) -> torch.Tensor:
    """``m`` of ``recovered``: the difference of totals with a foil, else the answer's total."""
    answer, foil = continuation.totals(lane_logits)
    return answer if foil is None else answer - foil


@dataclass
class ContinuationGrader:
    """Scores rows of lane logits under a metric (everything but ``kl``)."""

    grading: Grading
    continuation: Continuation

    def __call__(self, lane_logits: list[torch.Tensor]) -> torch.Tensor:
        answer, foil = self.continuation.totals(lane_logits)
        diff = None if foil is None else answer - foil
        values = self.grading.score(
            answer.cpu().numpy(), None if diff is None else diff.cpu().numpy()
        )
        return torch.from_numpy(values)


def check_multi_token_metric(metric: str, continuation: Continuation) -> None:
    if continuation.multi and metric == "kl":
        raise InvalidArgument(
            "metric 'kl' compares next-token distributions, which do not depend on the "
            "answer: a multi-token answer or foil cannot be graded with it (use logprob, "
            "logit_diff or recovered, or a one-token answer)",
            "metric",
        )
