"""``POST /v1/patch_sweep``: the response body and the stream's Server-Sent Events (docs/api.md §2).

A grid is ``grid[i][j]`` for layer ``layers[i]`` and position ``positions[j]``
(``attn_head``: ``grid[i][j][k]`` for ``heads[k]``); ``null`` marks a skipped
cell. The ``summary`` event of a stream is exactly the non-streaming body
plus ``"type": "summary"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from patchserve.text.alignment import Alignment, differing_positions
from patchserve.wire.base import WireModel, omitted_if_none
from patchserve.wire.errors import ErrorDetail
from patchserve.wire.requests import HookName, MetricName, SweepMethod

Grid = list[list[float | None]] | list[list[list[float | None]]]
CellKind = Literal["exact", "estimate"]
KindGrid = list[list[CellKind | None]] | list[list[list[CellKind | None]]]

#: The ``reason`` of a skipped cell whose destination position has no clean partner.
UNALIGNED = "no aligned clean position (differing middle)"


class Argmax(WireModel):
    """The most restored cell of a grid (lowest value for ``kl``)."""

    layer: int
    position: int | None = omitted_if_none(
        description="absent for a head sweep that is not per position"
    )
    value: float
    head: int | None = omitted_if_none()


class HookGrid(WireModel):
    hook: HookName
    grid: Grid
    argmax: Argmax | None
    stderr: Grid | None = omitted_if_none(
        description="noise corruption: the standard error of each cell's mean over samples"
    )


class NoiseSummary(WireModel):
    """The noise corruption a sweep averaged over (ROME's causal tracing)."""

    positions: list[int] = Field(description="the noised token positions (the subject)")
    scale: float
    sigma: float = Field(description="the noise's standard deviation: scale x std(embeddings)")
    samples: int
    seed: int
    corrupt_stderr: float = Field(description="standard error of the corrupt baseline's mean")


class SkippedCell(WireModel):
    hook: HookName
    layer: int
    position: int | None = omitted_if_none()
    head: int | None = omitted_if_none()
    reason: str


class AlignmentSummary(WireModel):
    """How corrupt positions pair with clean ones (the seed's fields, plus mode and shift)."""

    n_clean: int
    n_corrupt: int
    prefix_len: int
    suffix_len: int
    unaligned_positions: list[int]
    mode: Literal["positional", "prefix_suffix"]
    shift: int
    differing_positions: list[int] = Field(
        default_factory=list,
        description="corrupt positions whose token differs from its clean partner, or that "
        "have none: where the corruption is",
    )

    @classmethod
    def of(
        cls, alignment: Alignment, clean_ids: Sequence[int], corrupt_ids: Sequence[int]
    ) -> AlignmentSummary:
        return cls(
            differing_positions=differing_positions(alignment, clean_ids, corrupt_ids),
            n_clean=alignment.clean_length,
            n_corrupt=alignment.corrupt_length,
            prefix_len=alignment.prefix,
            suffix_len=alignment.suffix,
            unaligned_positions=alignment.unpaired(),
            mode="positional" if alignment.equal_length else "prefix_suffix",
            shift=alignment.shift,
        )


class Timing(WireModel):
    seconds: float
    cells: int
    cells_per_second: float
    cells_computed: int
    cells_free: int


class TopLogprob(WireModel):
    token_id: int
    token: str
    logprob: float


class Baseline(WireModel):
    value: float
    top_logprobs: list[TopLogprob]


class Baselines(WireModel):
    corrupt: Baseline
    clean: Baseline | None = None


class SweepBody(WireModel):
    """The whole answer of a sweep."""

    object: Literal["patch_sweep"] = "patch_sweep"
    model: str
    hook: HookName
    hooks: list[HookName]
    layers: list[int]
    positions: list[int]
    heads: list[int] | None = None
    per_position: bool = Field(
        default=True,
        description="false: an attn_head grid is [layer][head], each head patched at "
        "every position at once",
    )
    metric: MetricName
    answer_token_id: int = Field(description="the answer's first token")
    answer_token: str = Field(description="the whole graded answer, decoded")
    answer_token_ids: list[int] = Field(
        description="every token of the answer (several: graded by their teacher-forced total "
        "log-probability)"
    )
    foil_token_id: int | None = None
    foil_token: str | None = None
    foil_token_ids: list[int] | None = None
    grid: Grid
    argmax: Argmax | None
    hook_grids: list[HookGrid] | None = None
    clean: float | None = Field(
        description="the clean run's value in the metric's units; for 'recovered' the raw "
        "baseline m_clean (log p(answer), or the logit difference with a foil), as the seed "
        "reports it; null when no clean run was graded"
    )
    corrupt: float = Field(
        description="the unpatched corrupt run's value, likewise (for 'recovered': m_corrupt)"
    )
    noise_floor: float = Field(
        description="|corrupt metric through the sweep path - solo corrupt metric|, in the "
        "metric's units"
    )
    skipped: list[SkippedCell]
    alignment: AlignmentSummary | None
    warnings: list[str] = Field(
        default_factory=list,
        description="results that are valid but probably not what was meant (an improbable "
        "answer whose spelling variant is likely, identical prompts, a span that occurs more "
        "than once; a sweep whose every cell would be skipped is a 400 instead)",
    )
    tokens: list[str]
    timing: Timing
    auto_captured: bool
    captured_source_run: str | None
    source_run: str | None
    baselines: Baselines
    window: int = Field(default=1, description="layers each cell restored at once (ROME's window)")
    stderr_grid: Grid | None = omitted_if_none(
        description="noise corruption: the standard error of each cell of `grid`"
    )
    noise: NoiseSummary | None = omitted_if_none()
    method: SweepMethod = "exact"
    kinds: dict[HookName, KindGrid] | None = Field(
        default=None,
        description="for methods 'attribution' and 'attribution+verify': each hook's grid of "
        "'exact' / 'estimate' (null: skipped), laid out as its value grid",
    )


class StartEvent(WireModel):
    type: Literal["start"] = "start"
    hook: HookName
    hooks: list[HookName]
    layers: list[int]
    positions: list[int]
    heads: list[int] | None = omitted_if_none()
    per_position: bool = True
    metric: MetricName
    tokens: list[str]
    auto_captured: bool
    captured_source_run: str | None
    total: int


class CellEvent(WireModel):
    type: Literal["cell"] = "cell"
    hook: HookName
    layer: int
    position: int | None = omitted_if_none()
    head: int | None = omitted_if_none()
    value: float | None
    error: str | None = omitted_if_none()
    stderr: float | None = omitted_if_none(
        description="noise corruption: standard error of the value (a mean over samples)"
    )
    done: int
    total: int
    kind: CellKind | None = omitted_if_none(
        description="attribution methods: 'estimate' (sent first) or 'exact' (a verified cell, "
        "replacing its estimate)"
    )


class SummaryEvent(SweepBody):
    type: Literal["summary"] = "summary"


class ErrorEvent(WireModel):
    """A failure after the stream started (the status line was already 200)."""

    type: Literal["error"] = "error"
    error: ErrorDetail


SweepEvent = Annotated[
    StartEvent | CellEvent | SummaryEvent | ErrorEvent, Field(discriminator="type")
]
SWEEP_EVENT: TypeAdapter[SweepEvent] = TypeAdapter(SweepEvent)
