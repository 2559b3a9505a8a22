"""``POST /v1/patch_study``: many facts, one grid each, and ROME's aggregate (docs/api.md §2b).

Each item is one ``/v1/patch_sweep`` over every position of its clean prompt,
corrupted by its own ``corruption`` (noise on the subject, or a second
prompt); the study's settings (hooks, layers, window, metric) apply to all.
The aggregate averages the items' grids on ROME's named token roles
(``patchserve.text.roles``): ``grid[i][r]`` is the mean, over every item's
tokens of role ``roles[r]``, of the cell value at layer ``layers[i]``
(``null`` where no item has a token of that role); ``counts[r]`` is how many
tokens that is. The stream sends ``start``, one ``item`` per fact as it
finishes, then ``summary`` (= the body) and ``[DONE]``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictInt, TypeAdapter

from patchserve.wire.base import WireModel
from patchserve.wire.requests import Corruption, HookName, MetricName, RequestBody, Strict
from patchserve.wire.sweep import ErrorEvent, SweepBody

MAX_STUDY_ITEMS = 256


class StudyItem(Strict):
    """One fact: its clean prompt, how to corrupt it, and what to grade."""

    prompt: str
    """The clean prompt."""
    corruption: Corruption
    """``{"type": "noise", "span": subject, ...}`` or ``{"type": "replace", "prompt": ...}``."""
    answer_token: str | None = None
    """The graded token (default: the clean run's top-1)."""
    answer_token_id: StrictInt | None = None
    """The graded token by id."""
    foil_token: str | None = None
    """A contrast token (``logit_diff``, ``recovered``)."""
    foil_token_id: StrictInt | None = None
    """The foil by id."""


class PatchStudyRequest(Strict, RequestBody):
    """Many facts traced alike, averaged on ROME's token roles."""

    items: list[StudyItem] = Field(min_length=1, max_length=MAX_STUDY_ITEMS)
    """The facts."""
    hook: HookName | None = None
    """The hook to sweep (default ``post_block``)."""
    hooks: list[HookName] | None = None
    """Several hooks at once."""
    layers: list[StrictInt] | Literal["all"] | None = None
    """Layers to sweep (default all)."""
    window: StrictInt = Field(1, ge=1)
    """Layers each cell restores at once (ROME: 10 for ``mlp_out`` / ``attn_out``)."""
    metric: MetricName = "prob"
    """What each cell reports (ROME: ``prob``, the answer's probability)."""
    stream: bool = False
    """Answer with Server-Sent Events: start, item..., summary (= the body), [DONE]."""
    logprobs: StrictInt = Field(5, ge=0, le=100)
    """How many next-token candidates each item's baselines list."""
    model: str | None = None
    """The served model's name; optional."""


class RoleGrid(WireModel):
    hook: HookName
    grid: list[list[float | None]] = Field(description="[layer][role]: mean cell value")
    effect: list[list[float | None]] = Field(
        description="[layer][role]: mean of (cell value - its item's corrupt baseline), "
        "ROME's average indirect effect"
    )
    counts: list[int] = Field(description="tokens averaged per role, over all items")


class StudyAggregate(WireModel):
    """The items' grids averaged on ROME's token roles."""

    roles: list[str]
    layers: list[int]
    metric: MetricName
    window: int
    hook_grids: list[RoleGrid]
    corrupt: float = Field(description="mean of the items' corrupt baselines")
    clean: float | None = Field(description="mean of the items' clean values (null if any lacks)")


class PatchStudyBody(WireModel):
    object: Literal["patch_study"] = "patch_study"
    model: str
    items: list[SweepBody]
    subjects: list[list[int]] = Field(description="each item's subject token positions")
    aggregate: StudyAggregate


class StudyStartEvent(WireModel):
    type: Literal["start"] = "start"
    items: int
    roles: list[str]


class StudyItemEvent(WireModel):
    type: Literal["item"] = "item"
    index: int
    subject: list[int]
    body: SweepBody


class StudySummaryEvent(PatchStudyBody):
    type: Literal["summary"] = "summary"


StudyEvent = Annotated[
    StudyStartEvent | StudyItemEvent | StudySummaryEvent | ErrorEvent,
    Field(discriminator="type"),
]
STUDY_EVENT: TypeAdapter[StudyEvent] = TypeAdapter(StudyEvent)
