"""Request bodies (pydantic). Field names follow the seed server's wire format."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

Number = StrictInt | StrictFloat


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
    hook: str | None = None
    hooks: list[str] | None = None
    layers: list[StrictInt] | LayerRange | Literal["all"] | None = None
    positions: Literal["all_prompt"] | list[StrictInt | SpanPosition] = "all_prompt"
    heads: list[StrictInt] | Literal["all"] | None = None
    alpha: Number = 1.0
    answer_token: str | None = None
    answer_token_id: StrictInt | None = None
    foil_token: str | None = None
    foil_token_id: StrictInt | None = None
    metric: str = "logprob"
    clean_baseline: Number | None = None
    keep_source: bool = False
    stream: bool = False
    logprobs: StrictInt = Field(20, ge=0, le=100)
    model: str | None = None


class PatchSourceRequest(Strict):
    run: str | None = None
    prompt: str
    hooks: dict[str, list[StrictInt] | Literal["all"]] | None = None
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
    vectors: dict[str, dict[str, ModuleVector]]
    overwrite: bool = False


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_none=True)
