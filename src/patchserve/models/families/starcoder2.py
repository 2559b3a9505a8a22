"""Starcoder2: LayerNorms with bias, a non-gated ``c_fc`` / ``c_proj`` MLP, biases on every
linear (``use_bias``), grouped-query attention, a sliding window on every layer."""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import ModelConfig, make_rope, require, rope_parameters
from patchserve.models.families.base import Family, Mapped, map_decoder_layout

NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    **{f"self_attn.{p}_proj": f"attn.{p}_proj" for p in "qkvo"},
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = raw.get("head_dim") or hidden // heads
    params = rope_parameters(raw)
    if params.get("rope_type", "default") == "default":
        params.pop("partial_rotary_factor", None)  # Starcoder2's default rope rotates head_dim
    rope = make_rope(params, head_dim)
    bias = bool(raw.get("use_bias", True))
    window = raw.get("sliding_window")
    return ModelConfig(
        family="starcoder2",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(raw, "intermediate_size"),
        norm_kind="layer",
        norm_eps=float(raw.get("norm_epsilon", 1e-5)),
        activation=raw.get("hidden_act", "gelu_pytorch_tanh"),
        gated_mlp=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=(rope,) * layers,
        sliding_windows=(window or None,) * layers,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def _map_block(layer: int, rest: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    """A tensor of block ``layer`` (``rest``: its name inside the block)."""
    module, _, kind = rest.rpartition(".")
    if module in NAMES:
        return [(f"blocks.{layer}.{NAMES[module]}.{kind}", tensor)]
    return None


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    return map_decoder_layout(name, tensor, cfg, _map_block)


FAMILY = Family(
    name="starcoder2",
    architectures=("Starcoder2ForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
