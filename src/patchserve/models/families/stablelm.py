"""StableLM (2, 3B-4E1T): LayerNorms with bias, partial rotary, optional q/k/v biases,
per-head q/k LayerNorms (``qk_layernorm``, one bias-free weight per head) and parallel
residual (``use_parallel_residual``: one ``input_layernorm`` feeds both branches)."""

from __future__ import annotations

import re
from typing import Any

import torch

from patchserve.models.config import ModelConfig, make_rope, require, rope_parameters
from patchserve.models.families.base import Family, Mapped, map_decoder_layout

LINEARS = {
    **{f"self_attn.{p}_proj": f"attn.{p}_proj" for p in "qkvo"},
    **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")},
}
HEAD_NORM = re.compile(r"self_attn\.([qk])_layernorm\.norms\.(\d+)\.weight")


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = hidden // heads
    params = rope_parameters(raw)
    params.setdefault("partial_rotary_factor", 0.25)  # StableLmConfig's default
    rope = make_rope(params, head_dim)
    qk_norm = bool(raw.get("qk_layernorm", False))
    return ModelConfig(
        family="stablelm",
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
        activation=raw.get("hidden_act", "silu"),
        gated_mlp=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=(rope,) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        qkv_bias=bool(raw.get("use_qkv_bias", False)),
        qk_norm=qk_norm,
        parallel_residual=bool(raw.get("use_parallel_residual", False)),
        qk_norm_kind="layer_no_bias" if qk_norm else None,
        qk_norm_per_head=qk_norm,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def _map_block(layer: int, rest: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    """A tensor of block ``layer`` (``rest``: its name inside the block)."""
    block = f"blocks.{layer}"
    module, _, kind = rest.rpartition(".")
    if module == "input_layernorm":
        norms = ("attn_norm", "mlp_norm") if cfg.parallel_residual else ("attn_norm",)
        return [(f"{block}.{norm}.{kind}", tensor) for norm in norms]
    if module == "post_attention_layernorm" and not cfg.parallel_residual:
        return [(f"{block}.mlp_norm.{kind}", tensor)]
    head_norm = HEAD_NORM.fullmatch(rest)
    if head_norm is not None:
        which, head = head_norm.groups()
        return [(f"{block}.attn.{which}_norm.weight.{head}", tensor)]
    if module in LINEARS:
        return [(f"{block}.{LINEARS[module]}.{kind}", tensor)]
    return None


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    return map_decoder_layout(name, tensor, cfg, _map_block)


FAMILY = Family(
    name="stablelm",
    architectures=("StableLmForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
