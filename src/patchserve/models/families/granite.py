"""Granite (3.x): Llama's layout and tensor names, with four multipliers — embeddings × m,
each branch output × the residual multiplier (so it is part of ``attn_out`` / ``mlp_out``),
the attention multiplier as the score scale, logits ÷ ``logits_scaling``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from patchserve.models.config import ModelConfig
from patchserve.models.families import llama
from patchserve.models.families.base import Family


def _factor(raw: dict[str, Any], key: str) -> float | None:
    """``raw[key]`` as a float, or None when it is 1 (a no-op multiplier)."""
    value = float(raw.get(key, 1.0))
    return None if value == 1.0 else value


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    cfg = llama.read_config(raw, architecture)
    logits_scaling = _factor(raw, "logits_scaling")
    return replace(
        cfg,
        family="granite",
        embed_scale=_factor(raw, "embedding_multiplier"),
        residual_multiplier=_factor(raw, "residual_multiplier"),
        attn_scale=float(raw.get("attention_multiplier", 1.0)),
        logit_scale=1.0 / logits_scaling if logits_scaling is not None else None,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
    )


FAMILY = Family(
    name="granite",
    architectures=("GraniteForCausalLM",),
    read_config=read_config,
    map_tensor=llama.map_tensor,
)
