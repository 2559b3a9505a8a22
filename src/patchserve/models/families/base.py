"""What a family module provides to the loader."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from patchserve.models.config import ModelConfig

Mapped = list[tuple[str, torch.Tensor]]


class ConfigReader(Protocol):
    def __call__(self, raw: dict[str, Any], architecture: str) -> ModelConfig: ...


class TensorMapper(Protocol):
    def __call__(self, name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None: ...


@dataclass(frozen=True)
class Family:
    """``read_config`` builds the config; ``map_tensor`` returns the runtime
    parameters a checkpoint tensor becomes (``[]`` for tensors deliberately
    ignored, such as cached masks; ``None`` for names it does not know)."""

    name: str
    architectures: tuple[str, ...]
    read_config: ConfigReader
    map_tensor: TensorMapper


def strip_prefix(name: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def split_layer(name: str, layers_prefix: str) -> tuple[int, str] | None:
    """``"layers.3.mlp.up_proj.weight"`` → ``(3, "mlp.up_proj.weight")``."""
    if not name.startswith(layers_prefix):
        return None
    index, _, rest = name[len(layers_prefix) :].partition(".")
    if not index.isdigit():
        return None
    return int(index), rest


BlockMapper = Callable[[int, str, torch.Tensor, ModelConfig], "Mapped | None"]


def map_decoder_layout(
    name: str,
    tensor: torch.Tensor,
    cfg: ModelConfig,
    block: BlockMapper,
    prefixes: tuple[str, ...] = ("model.",),
) -> Mapped | None:
    """The checkpoint layout most families share (Llama's): ``lm_head`` (dropped when tied),
    ``{prefix}embed_tokens``, ``{prefix}norm.*`` (the final norm), rotary caches (dropped) and
    ``{prefix}layers.N.rest``, which ``block(N, rest, tensor, cfg)`` maps."""
    if name == "lm_head.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", tensor)]
    name = strip_prefix(name, prefixes)
    if name == "embed_tokens.weight":
        return [("embed_tokens.weight", tensor)]
    if name.startswith("norm."):
        return [("final_norm." + name.rpartition(".")[2], tensor)]
    if name.endswith("rotary_emb.inv_freq"):
        return []
    split = split_layer(name, "layers.")
    return None if split is None else block(split[0], split[1], tensor, cfg)
