"""Cohere (Command R): parallel residual reading one ``input_layernorm``, mean-centred
bias-free float32 LayerNorms, interleaved rotary, ``logit_scale``, optional per-head q/k
LayerNorms (``use_qk_norm``, weights ``[heads, head_dim]``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from patchserve.models.config import (
    CheckpointError,
    ModelConfig,
    make_rope,
    require,
    rope_parameters,
)
from patchserve.models.families.base import Family, Mapped, map_decoder_layout

COHERE_THETA = 500000.0  # CohereConfig.default_theta
LINEARS = {
    **{f"self_attn.{p}_proj": f"attn.{p}_proj" for p in "qkvo"},
    **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")},
}


def _logit_scale(raw: dict[str, Any]) -> float:
    scale = raw.get("logit_scale", 0.0625)  # CohereConfig's default
    if scale is None:
        raise CheckpointError("config.json logit_scale is null; Cohere multiplies logits by it")
    return float(scale)


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = raw.get("head_dim") or hidden // heads
    params = rope_parameters({"rope_theta": COHERE_THETA, **raw})
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(
            "config.json partial_rotary_factor: transformers' Cohere rotates every channel "
            f"of a head, not {params['partial_rotary_factor']} of them"
        )
    rope = dataclasses.replace(make_rope(params, head_dim), interleaved=True)
    bias = bool(raw.get("attention_bias", False))
    qk_norm = bool(raw.get("use_qk_norm", False))
    return ModelConfig(
        family="cohere",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(raw, "intermediate_size"),
        norm_kind="layer_no_bias",
        norm_eps=float(raw.get("layer_norm_eps") or 1e-5),
        activation=raw.get("hidden_act", "silu"),
        gated_mlp=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=(rope,) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 8192),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=qk_norm,
        parallel_residual=True,
        logit_scale=_logit_scale(raw),
        qk_norm_kind="layer_no_bias" if qk_norm else None,
        qk_norm_per_head=qk_norm,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def _map_block(layer: int, rest: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    """A tensor of block ``layer`` (``rest``: its name inside the block)."""
    block = f"blocks.{layer}"
    if rest == "input_layernorm.weight":  # both branches read the same normalised input
        return [(f"{block}.attn_norm.weight", tensor), (f"{block}.mlp_norm.weight", tensor)]
    if rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        # [heads, head_dim]: one weight row per head
        target = f"{block}.attn.{rest.split('.')[1]}.weight"
        return [(f"{target}.{h}", row) for h, row in enumerate(tensor.unbind(0))]
    module, _, kind = rest.rpartition(".")
    if module in LINEARS:
        return [(f"{block}.{LINEARS[module]}.{kind}", tensor)]
    return None


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    return map_decoder_layout(name, tensor, cfg, _map_block)


FAMILY = Family(
    name="cohere",
    architectures=("CohereForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
