"""Server information and text: ``/v1/models``, ``/health``, ``/tokenize``, ``/detokenize``,
and the named vectors of ``/v1/steering/modules``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from patchserve.wire.base import WireModel
from patchserve.wire.requests import HookName


class ModelCard(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    device: str
    chat_template: bool
    runtime: Literal["native", "transformers"] = Field(
        "native", description="what runs the model: our hooked runtime, or transformers itself"
    )
    hooks: list[HookName] = Field(
        default_factory=list, description="the hooks this model's runtime provides exactly"
    )


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(WireModel):
    status: Literal["ok"] = "ok"
    model: str


CharSpan = Annotated[list[int], Field(min_length=2, max_length=2)]


class TokenizeResponse(WireModel):
    tokens: list[int]
    token_strs: list[str]
    offsets: list[CharSpan] | None = Field(
        description="[start, end) character range of each token in the prompt"
    )
    special: list[bool]
    count: int


class DetokenizeResponse(WireModel):
    prompt: str


class ModuleVectorInfo(WireModel):
    hook: HookName
    layer: int
    width: int


class ModuleInfo(WireModel):
    name: str
    object: Literal["steering_module"] = "steering_module"
    builtin: bool = False
    vectors: list[ModuleVectorInfo]


class ModuleList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModuleInfo]


class ModuleRegistered(WireModel):
    name: str
    object: Literal["steering_module"] = "steering_module"
    registered: int


class ModuleDeleted(WireModel):
    name: str
    object: Literal["steering_module"] = "steering_module"
    deleted: Literal[True] = True
