"""The sweep planner: patched rows → ordered batches under the token budget (pure, no torch).

A row is a cell to compute, known here only by where it resumes (its
:class:`ResumeKey`) and its *offset*, the first position it patches: it
recomputes every lane from its offset on. Rows of one resume key share one
pass. Groups keep the order their first row was planned in; inside a group
rows are packed back to back, longest (lowest offset) first so that attention
padding stays small, under the token budget and under a cap on attention-score
elements, so that memory is bounded by the budget, not by the grid. The first
batch that resumes inside the model carries the unpatched probe row that
measures the noise floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

SCORE_ELEMENTS_CAP = 24 * 2**20  # attention scores per batch (x4 bytes in float32)


class ResumeKey(NamedTuple):
    """Where the rows of one pass resume and what they patch."""

    start: int  # the first block run (num_layers: only the unembedding)
    site: str  # the site the patch is written at
    hook: str  # the swept hook
    reuse: str | None  # the corrupt attention activations reused inside block ``start``
    extra: tuple[int, ...]  # a window's further layers, patched on the way


@dataclass(frozen=True)
class AttentionShape:
    """What bounds a batch's attention working set."""

    num_heads: int
    head_dim: int
    softcapped: bool  # scores written out (length x length per head), not flash attention


@dataclass(frozen=True)
class Batch:
    """One pass: rows (indices into the planned rows) resumed at ``key``."""

    key: ResumeKey
    rows: list[int]
    probe: bool = False  # carries the unpatched row of the noise floor


def resume_point(hook: str, layer: int) -> tuple[int, str, str | None]:
    """(start block, site the patch is written at, reused attention) for a cell."""
    if hook == "post_block":
        return layer + 1, "pre_attn", None
    if hook == "pre_attn":
        return layer, "pre_attn", None
    if hook == "attn_head":
        return layer, "attn_head", "attn_head"
    return layer, hook, "attn_out"


def reaches_last_position(
    hook: str, layer: int, position: int, num_layers: int, length: int
) -> bool:
    """Whether a patch can change the last position's logits at all."""
    if position == length - 1:
        return True
    # After the last block's attention nothing mixes positions any more.
    return not (layer == num_layers - 1 and hook != "pre_attn")


def pack(
    offsets: Sequence[int], lanes: Sequence[int], max_tokens: int, shape: AttentionShape
) -> list[list[int]]:
    """Rows (by index) longest first, packed under the token budget and the score cap.

    A row of offset ``p`` costs ``lane - p`` tokens in every lane; the budget is at
    least one whole row of every lane, so that any row fits alone.
    """
    length = max(lanes)
    budget = max(max_tokens, length * len(lanes))
    order = sorted(range(len(offsets)), key=lambda i: offsets[i])
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    # attention sees every row at all ``length`` slots (batch-invariant geometry):
    # written-out scores (soft-capped models) hold length x length per head, flash
    # attention's working set length x head_dim
    per_slot = length if shape.softcapped else shape.head_dim
    for i in order:
        size = sum(lane - offsets[i] for lane in lanes)
        scores = (len(current) + 1) * len(lanes) * shape.num_heads * length * per_slot
        if current and (tokens + size > budget or scores > SCORE_ELEMENTS_CAP):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += size
    if current:
        batches.append(current)
    return batches


def plan_batches(
    rows: Sequence[tuple[ResumeKey, int]],
    lanes: Sequence[int],
    max_tokens: int,
    shape: AttentionShape,
    num_layers: int,
    probe: bool = True,
) -> list[Batch]:
    """The sweep's passes, in order, for ``rows`` given as ``(key, offset)``.

    ``lanes`` are the token lengths of the answer lanes (prompt plus tail); with
    ``probe`` the first batch resuming inside the model (``start < num_layers``)
    carries the probe row.
    """
    groups: dict[ResumeKey, list[int]] = {}
    for i, (key, _) in enumerate(rows):
        groups.setdefault(key, []).append(i)
    plan: list[Batch] = []
    for key, members in groups.items():
        offsets = [rows[i][1] for i in members]
        for packed in pack(offsets, lanes, max_tokens, shape):
            carries = probe and key.start < num_layers
            probe = probe and not carries
            plan.append(Batch(key, [members[j] for j in packed], carries))
    return plan
