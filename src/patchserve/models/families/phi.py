"""Phi (1, 1.5, 2): parallel residual reading one ``input_layernorm``, partial rotary,
biases everywhere (``lm_head`` too), optional ``qk_layernorm`` (one LayerNorm over
``head_dim`` with bias, shared by every head)."""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import ModelConfig, make_rope, require, rope_parameters
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix

NAMES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.dense": "attn.o_proj",
    "self_attn.q_layernorm": "attn.q_norm",
    "self_attn.k_layernorm": "attn.k_norm",
    "mlp.fc1": "mlp.up_proj",
    "mlp.fc2": "mlp.down_proj",
}


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = raw.get("head_dim") or hidden // heads
    params = rope_parameters(raw)
    params.setdefault("partial_rotary_factor", 0.5)  # PhiConfig's default
    rope = make_rope(params, head_dim)
    qk_norm = bool(raw.get("qk_layernorm", False))
    return ModelConfig(
        family="phi",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(raw, "intermediate_size"),
        norm_kind="layer",
        norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
        activation=raw.get("hidden_act", "gelu_new"),
        gated_mlp=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=(rope,) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        qk_norm=qk_norm,
        parallel_residual=True,
        lm_head_bias=True,
        qk_norm_kind="layer" if qk_norm else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    if name == "lm_head.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", tensor)]
    if name == "lm_head.bias":
        return [("lm_head.bias", tensor)]
    name = strip_prefix(name, ("model.",))
    if name == "embed_tokens.weight":
        return [("embed_tokens.weight", tensor)]
    if name.startswith("final_layernorm."):
        return [("final_norm." + name.rpartition(".")[2], tensor)]
    if name.endswith("rotary_emb.inv_freq"):
        return []
    split = split_layer(name, "layers.")
    if split is None:
        return None
    layer, rest = split
    module, _, kind = rest.rpartition(".")
    block = f"blocks.{layer}"
    if module == "input_layernorm":  # both branches read the same normalised input
        return [(f"{block}.attn_norm.{kind}", tensor), (f"{block}.mlp_norm.{kind}", tensor)]
    if module in NAMES:
        return [(f"{block}.{NAMES[module]}.{kind}", tensor)]
    return None


FAMILY = Family(
    name="phi",
    architectures=("PhiForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
