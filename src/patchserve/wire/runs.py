"""``/v1/patch_source``: a stored run's manifest, the capture answer, listings, drops."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from patchserve.wire.base import WireModel, omitted_if_none
from patchserve.wire.requests import HookName, PackedVectors
from patchserve.wire.sweep import TopLogprob


class RunActivations(PackedVectors):
    """One site's ``[positions, width]`` activations, packed like ``patch_vectors``."""

    hook: HookName
    layer: int
    positions: list[int]


class Graded(WireModel):
    answer_token_id: int
    logprob: float
    foil_token_id: int | None = omitted_if_none()
    logit_diff: float | None = omitted_if_none()


class RunManifest(WireModel):
    """What a stored run holds (its name is ``run``)."""

    object: Literal["patch_source"] = "patch_source"
    run: str
    prompt: str
    token_ids: list[int]
    num_tokens: int
    hooks: dict[HookName, list[int]]
    positions: list[int]
    dtype: str
    bytes: int
    created: int
    kept: bool
    leases: int
    top_logprobs: list[TopLogprob] | None = omitted_if_none(
        description="the clean next-token top-k (the capture answer only)"
    )
    graded: Graded | None = omitted_if_none()
    activations: RunActivations | None = omitted_if_none()


class RunList(WireModel):
    object: Literal["list"] = "list"
    data: list[RunManifest]


class RunDropped(WireModel):
    object: Literal["patch_source"] = "patch_source"
    run: str
    dropped: Literal[True] = Field(default=True)
