"""Gemma 2 and Gemma 3 (text): 1+w RMSNorms around both branches, scaled embeddings,
soft-capping, alternating sliding-window / global layers (Gemma 3: local and
global rope bases, q/k norm). Gemma (1): Llama's layout with 1+w RMSNorms and
scaled embeddings, nothing else."""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import (
    CheckpointError,
    ModelConfig,
    layer_windows,
    make_rope,
    require,
    rope_parameters,
)
from patchserve.models.families.base import Family, Mapped, map_decoder_layout
from patchserve.models.families.llama import BLOCK_NAMES as LLAMA_BLOCK_NAMES

BLOCK_NAMES = {
    **LLAMA_BLOCK_NAMES,
    "post_attention_layernorm.weight": "attn_post_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "mlp_post_norm.weight",
}


def _layer_types(raw: dict[str, Any], layers: int) -> list[str]:
    types = raw.get("layer_types")
    if types:
        return list(types)
    if raw.get("model_type") == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
    ]


def _gemma3_rope(raw: dict[str, Any], layer_type: str, head_dim: int):
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:
        return make_rope(rope_parameters(raw, layer_type), head_dim)
    # transformers 4.x spelling: global layers use rope_theta (+ rope_scaling),
    # local layers rope_local_base_freq without scaling.
    if layer_type == "sliding_attention":
        theta = raw.get("rope_local_base_freq", 10000.0)
        return make_rope({"rope_type": "default", "rope_theta": theta}, head_dim)
    return make_rope(rope_parameters(raw), head_dim)


def _gemma1_activation(raw: dict[str, Any]) -> str:
    """transformers reads ``hidden_act``, its legacy ``"gelu"`` meaning the tanh
    approximation; an older ``hidden_activation`` that disagrees is refused."""
    act = raw.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act
    other = raw.get("hidden_activation")
    if other is not None and other != act:
        raise CheckpointError(
            f"config.json hidden_activation {other!r} contradicts hidden_act "
            f"{raw.get('hidden_act')!r} (transformers runs {act!r})"
        )
    return act


def _read_gemma1(raw: dict[str, Any], architecture: str) -> ModelConfig:
    if raw.get("use_bidirectional_attention"):
        raise CheckpointError("config.json use_bidirectional_attention: not a causal LM")
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = raw.get("head_dim") or hidden // heads
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        family="gemma1",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(raw, "intermediate_size"),
        norm_kind="rms_one_plus",
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        activation=_gemma1_activation(raw),
        gated_mlp=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=(make_rope(rope_parameters(raw), head_dim),) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 8192),
        qkv_bias=bias,
        o_bias=bias,
        embed_scale=hidden**0.5,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    if architecture == "GemmaForCausalLM":
        return _read_gemma1(raw, architecture)
    gemma3 = raw.get("model_type", "").startswith("gemma3") or architecture.startswith("Gemma3")
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = raw.get("head_dim") or hidden // heads
    types = _layer_types(raw, layers)
    if gemma3:
        rope = tuple(_gemma3_rope(raw, t, head_dim) for t in types)
    else:
        rope = (make_rope(rope_parameters(raw), head_dim),) * layers
    raw = {**raw, "layer_types": types}
    return ModelConfig(
        family="gemma3" if gemma3 else "gemma2",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(raw, "intermediate_size"),
        norm_kind="rms_one_plus",
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        activation=raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh",
        gated_mlp=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=rope,
        sliding_windows=layer_windows(raw, layers),
        attn_scale=float(raw.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 8192),
        qkv_bias=bool(raw.get("attention_bias", False)),
        o_bias=bool(raw.get("attention_bias", False)),
        qk_norm=gemma3,
        post_attn_norm=True,
        post_mlp_norm=True,
        embed_scale=hidden**0.5,
        attn_softcap=raw.get("attn_logit_softcapping"),
        final_softcap=raw.get("final_logit_softcapping"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def _map_block(layer: int, rest: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    """A tensor of block ``layer`` (``rest``: its name inside the block)."""
    names = LLAMA_BLOCK_NAMES if cfg.family == "gemma1" else BLOCK_NAMES
    target = names.get(rest)
    return None if target is None else [(f"blocks.{layer}.{target}", tensor)]


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    return map_decoder_layout(name, tensor, cfg, _map_block, ("model.language_model.", "model."))


FAMILY = Family(
    name="gemma",
    architectures=("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"),
    read_config=read_config,
    map_tensor=map_tensor,
)
