"""Request bodies (pydantic, torch-free). Field names follow the seed server's wire format.

Hook and metric names are enums in the schema; every number that reaches the
model is finite and representable in float32 (``alpha: 1e39`` is a 400, not a
silent ``inf``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from patchserve.wire.hooks import HOOKS, METRICS

FLOAT32_MAX = 3.4028234663852886e38

HookName = Literal[HOOKS]  # type: ignore[valid-type]
MetricName = Literal[METRICS]  # type: ignore[valid-type]


def _float32(value: int | float) -> int | float:
    try:
        as_float = float(value)
    except OverflowError:
        raise ValueError("must be a finite number within float32 range") from None
    if not math.isfinite(as_float) or abs(as_float) > FLOAT32_MAX:
        raise ValueError("must be a finite number within float32 range")
    return value


Number = Annotated[StrictInt | StrictFloat, AfterValidator(_float32)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpanPosition(Strict):
    span: str
    occurrence: StrictInt = 0


class LayerRange(Strict):
    start: StrictInt = 0
    stop: StrictInt | None = None
    step: StrictInt = 1


class PackedVectors(Strict):
    dtype: Literal["float32", "float16", "bfloat16"]
    shape: list[StrictInt]
    data: str


class MaskSpec(Strict):
    indices: list[StrictInt] | None = None
    inline: StrictInt | None = None


class PatchSweepRequest(Strict):
    prompt: str
    clean_prompt: str | None = None
    source_run: str | None = None
    source_module: str | None = None
    source_inline: StrictInt | None = None
    patch_vectors: PackedVectors | None = None
    mask: MaskSpec | None = None
    hook: HookName | None = None
    hooks: list[HookName] | None = None
    layers: list[StrictInt] | LayerRange | Literal["all"] | None = None
    positions: Literal["all_prompt"] | list[StrictInt | SpanPosition] = "all_prompt"
    heads: list[StrictInt] | Literal["all"] | None = None
    alpha: Number = 1.0
    answer_token: str | None = None
    answer_token_id: StrictInt | None = None
    foil_token: str | None = None
    foil_token_id: StrictInt | None = None
    metric: MetricName = "logprob"
    clean_baseline: Number | None = None
    keep_source: bool = False
    stream: bool = False
    logprobs: StrictInt = Field(20, ge=0, le=100)
    model: str | None = None


class PatchSourceRequest(Strict):
    run: str | None = None
    prompt: str
    hooks: dict[HookName, list[StrictInt] | Literal["all"]] | None = None
    positions: Literal["all_prompt"] | list[StrictInt] = "all_prompt"
    answer_token: str | None = None
    answer_token_id: StrictInt | None = None
    foil_token: str | None = None
    foil_token_id: StrictInt | None = None
    overwrite: bool = False
    logprobs: StrictInt = Field(20, ge=0, le=100)
    model: str | None = None


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(BaseModel):
    tokens: list[StrictInt]
    model: str | None = None


class ModuleVector(Strict):
    vector: list[Number] | PackedVectors
    scale: Number = 1.0


class RegisterModuleRequest(Strict):
    name: str
    vectors: dict[HookName, dict[str, ModuleVector]]
    overwrite: bool = False


class PatchEntry(Strict):
    layer: StrictInt
    hook: HookName
    dest_position: StrictInt
    head: StrictInt | None = None
    source_run: str | None = None
    source_position: StrictInt | None = None
    source_module: str | None = None
    source_inline: StrictInt | None = None
    alpha: Number = 1.0
    mask: MaskSpec | None = None


class SteerEntry(Strict):
    layer: StrictInt
    hook: HookName
    source_module: str | None = None
    source_inline: StrictInt | None = None
    scale: Number = 1.0
    head: StrictInt | None = None


class CaptureSpec(Strict):
    run: str | None = None
    hooks: dict[HookName, list[StrictInt] | Literal["all"]] | None = None
    positions: Literal["all_prompt"] | list[StrictInt] = "all_prompt"
    overwrite: bool = False


class CaptureRequest(Strict):
    patch_source: CaptureSpec


class Interventions(BaseModel):
    """The patchserve extras shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    max_tokens: StrictInt | None = 16
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    logprobs: Any = None
    patch: list[PatchEntry] = Field(default_factory=list)
    patch_vectors: PackedVectors | None = None
    steer: list[SteerEntry] = Field(default_factory=list)
    capture: CaptureRequest | None = None
    capture_wait: bool = True
    logprob_token_ids: list[StrictInt] = Field(default_factory=list)
    n: StrictInt = 1
    stream: bool = False


class CompletionRequest(Interventions):
    prompt: str | list[str]
    echo: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(Interventions):
    messages: list[ChatMessage]
    top_logprobs: StrictInt | None = None
