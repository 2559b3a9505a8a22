"""Request bodies (pydantic, torch-free). Field names follow the seed server's wire format.

Hook and metric names are enums in the schema; every number that reaches the
model is finite and representable in float32 (``alpha: 1e39`` is a 400, not a
silent ``inf``). Every route's body is a ``RequestBody``: no string in it,
key or value, at any depth, holds a lone surrogate (JSON allows ``"\\ud800"``;
no tokenizer or encoder does).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    model_validator,
)
from pydantic_core import PydanticCustomError

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


_SURROGATE = re.compile("[\ud800-\udfff]")


def find_lone_surrogate(value: Any, where: str = "") -> tuple[str, str] | None:
    """``(param, what)`` of the first string holding a lone surrogate: its path
    (``patch.0.source_run``) and how to name it in a message."""
    if isinstance(value, str):
        return (where, where or "the body") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return where, f"a key of {where or 'the body'} ({key!a})"
        found = find_lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class RequestBody(BaseModel):
    """A route's whole body, checked once (nested models are part of it) for lone
    surrogates before any field is validated."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        found = find_lone_surrogate(data)
        if found is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "{what} holds a lone surrogate (an unpaired \\ud800-\\udfff escape); "
                "send valid Unicode text",
                {"param": found[0], "what": found[1]},
            )
        return data


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


class PatchSweepRequest(Strict, RequestBody):
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


class PatchSourceRequest(Strict, RequestBody):
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


class TokenizeRequest(RequestBody):
    prompt: str
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeRequest(RequestBody):
    tokens: list[StrictInt]
    model: str | None = None


class ModuleVector(Strict):
    vector: list[Number] | PackedVectors
    scale: Number = 1.0


class RegisterModuleRequest(Strict, RequestBody):
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


class Interventions(RequestBody):
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
