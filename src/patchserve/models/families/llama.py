"""Llama family: Llama (incl. Llama 3 rope scaling), Mistral, Qwen2, Qwen3 (q/k norm)."""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import (
    ModelConfig,
    layer_windows,
    make_rope,
    require,
    rope_parameters,
)
from patchserve.models.families.base import Family, Mapped, map_decoder_layout

# Checkpoint name (inside a block) → runtime name (inside ``blocks.N``).
BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    **{
        f"self_attn.{p}_proj.{kind}": f"attn.{p}_proj.{kind}"
        for p in "qkvo"
        for kind in ("weight", "bias")
    },
    **{
        f"mlp.{p}_proj.{kind}": f"mlp.{p}_proj.{kind}"
        for p in ("gate", "up", "down")
        for kind in ("weight", "bias")
    },
}


def _windows(raw: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    """Sliding windows: ``layer_types`` (5.x), else the 4.x flags — Mistral windows
    every layer, Qwen2/Qwen3 (``use_sliding_window``) the layers from ``max_window_layers`` on."""
    mistral = raw.get("model_type") == "mistral"
    window = raw.get("sliding_window")
    if raw.get("layer_types") or not (window and raw.get("use_sliding_window", mistral)):
        return layer_windows(raw, layers)
    first = 0 if mistral else raw.get("max_window_layers", 0)
    return tuple(window if i >= first else None for i in range(layers))


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = raw.get("head_dim") or hidden // heads
    rope = make_rope(rope_parameters(raw), head_dim)
    model_type = raw.get("model_type", "")
    # Qwen2 has biases on q/k/v (not o) whatever attention_bias says.
    qkv_bias = bool(raw.get("attention_bias", False)) or model_type == "qwen2"
    return ModelConfig(
        family="llama",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(raw, "intermediate_size"),
        norm_kind="rms",
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        activation=raw.get("hidden_act", "silu"),
        gated_mlp=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=(rope,) * layers,
        sliding_windows=_windows(raw, layers),
        attn_scale=head_dim**-0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        qkv_bias=qkv_bias,
        o_bias=bool(raw.get("attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3" or architecture == "Qwen3ForCausalLM",
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def _map_block(layer: int, rest: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    """A tensor of block ``layer`` (``rest``: its name inside the block)."""
    target = BLOCK_NAMES.get(rest)
    return None if target is None else [(f"blocks.{layer}.{target}", tensor)]


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    return map_decoder_layout(name, tensor, cfg, _map_block)


FAMILY = Family(
    name="llama",
    architectures=(
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ),
    read_config=read_config,
    map_tensor=map_tensor,
)
