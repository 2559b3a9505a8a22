"""Grading a sweep: the answer, the clean and corrupt baselines, and a scorer of lane logits.

A one-token answer is graded from the last prompt position's logits; a
multi-token one by its teacher-forced total over the answer lanes
(``engine/continuation.py``), the clean run's lanes one forward each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from patchserve.engine.continuation import Continuation, ContinuationGrader, raw_total
from patchserve.engine.metrics import Grader, raw_score
from patchserve.engine.runs import CapturedRun
from patchserve.engine.sweep import SweepSpec
from patchserve.engine.sweep_lanes import CorruptLane, Gate, clean_lane
from patchserve.models import Transformer

#: Metric values ``[n]`` of rows from each lane's logits ``[n, k, vocab]``.
Score = Callable[[list[torch.Tensor]], torch.Tensor]


def graded_answer(spec: SweepSpec, corrupt_logits: torch.Tensor) -> list[int]:
    """The graded answer: given, else the clean run's top-1 (the corrupt run's without)."""
    source = spec.source
    if spec.answer_ids is not None:
        return list(spec.answer_ids)
    if spec.answer is not None:
        return [spec.answer]
    clean_logits = source.last_logits if isinstance(source, CapturedRun) else None
    if clean_logits is None:
        clean_logits = corrupt_logits
    return [int(clean_logits.argmax())]


def token_grader(
    spec: SweepSpec, corrupt_logits: torch.Tensor, answer: int
) -> tuple[Grader, float | None]:
    """The grader of a one-token answer given the corrupt run's last logits, and the clean
    value (raw ``m`` for ``recovered``, as the seed reports it; graded otherwise)."""
    source = spec.source
    clean_logits = source.last_logits if isinstance(source, CapturedRun) else None
    reference = clean_logits if clean_logits is not None else corrupt_logits
    clean_lp = torch.log_softmax(reference.double(), dim=-1)
    clean_score = spec.clean_baseline
    if clean_logits is not None and clean_score is None:
        clean_score = float(raw_score(clean_logits[None], answer, spec.foil)[0])
    raw_corrupt = float(raw_score(corrupt_logits[None], answer, spec.foil)[0])
    grader = Grader(spec.metric, answer, spec.foil, clean_score, raw_corrupt, clean_lp)
    if spec.metric == "recovered":  # clean and corrupt are reported raw (as the seed)
        return grader, clean_score
    if clean_logits is None:
        return grader, None
    return grader, float(grader(clean_logits[None].to(corrupt_logits.device))[0])


def sweep_grader(
    model: Transformer,
    spec: SweepSpec,
    gate: Gate,
    continuation: Continuation,
    corrupt: list[CorruptLane],
) -> tuple[Score, float | None, float]:
    """The scorer of lane logits, the clean value and the raw corrupt ``m``."""
    if continuation.multi:
        return _continuation_grader(model, spec, gate, continuation, corrupt)
    grader, clean_value = token_grader(spec, corrupt[0].logits[0], continuation.answer[0])
    score: Score = lambda lanes: grader(lanes[0][:, 0])
    assert grader.corrupt_score is not None
    return score, clean_value, grader.corrupt_score


def _continuation_grader(
    model: Transformer,
    spec: SweepSpec,
    gate: Gate,
    cont: Continuation,
    corrupt: list[CorruptLane],
) -> tuple[Score, float | None, float]:
    """Totals of a multi-token answer; the clean run's lanes are one forward each."""
    source = spec.source
    clean = None
    if isinstance(source, CapturedRun):
        clean = [clean_lane(model, gate, source.token_ids, tail) for tail in cont.tails]
    clean_score = spec.clean_baseline
    if clean is not None and clean_score is None:
        clean_score = float(raw_total(cont, clean)[0])
    raw_corrupt = float(raw_total(cont, [c.logits[None] for c in corrupt])[0])
    foil = None if cont.foil is None else cont.foil[0]
    grading = Grader(spec.metric, cont.answer[0], foil, clean_score, raw_corrupt)
    grader = ContinuationGrader(grading, cont)
    if spec.metric == "recovered" or clean is None:
        return grader, clean_score if spec.metric == "recovered" else None, raw_corrupt
    return grader, float(grader(clean)[0]), raw_corrupt
