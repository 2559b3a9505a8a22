"""GPT-2: learned positions, LayerNorm, fused ``c_attn`` stored as ``Conv1D`` ([in, out])."""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import ModelConfig, require
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix

LINEARS = {
    "attn.c_proj": "attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
NORMS = {"ln_1": "attn_norm", "ln_2": "mlp_norm"}


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "n_embd", "hidden_size")
    heads = require(raw, "n_head", "num_attention_heads")
    layers = require(raw, "n_layer", "num_hidden_layers")
    head_dim = hidden // heads
    return ModelConfig(
        family="gpt2",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=raw.get("n_inner") or 4 * hidden,
        norm_kind="layer",
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        activation=raw.get("activation_function", "gelu_new"),
        gated_mlp=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=(None,) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=head_dim**-0.5 if raw.get("scale_attn_weights", True) else 1.0,
        attn_scale_by_layer=bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
        max_position_embeddings=require(raw, "n_positions", "max_position_embeddings"),
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        learned_positions=True,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    if name == "lm_head.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", tensor)]
    name = strip_prefix(name, ("transformer.",))
    simple = {
        "wte.weight": "embed_tokens.weight",
        "wpe.weight": "embed_positions.weight",
        "ln_f.weight": "final_norm.weight",
        "ln_f.bias": "final_norm.bias",
    }
    if name in simple:
        return [(simple[name], tensor)]
    split = split_layer(name, "h.")
    if split is None:
        return None
    layer, rest = split
    block = f"blocks.{layer}"
    module, _, kind = rest.rpartition(".")
    if rest in ("attn.bias", "attn.masked_bias"):
        return []  # cached causal masks in old checkpoints
    if module in NORMS:
        return [(f"{block}.{NORMS[module]}.{kind}", tensor)]
    if module == "attn.c_attn":
        # Conv1D keeps [in, out]; nn.Linear wants [out, in].
        parts = (tensor.t() if kind == "weight" else tensor).split(cfg.hidden_size, dim=0)
        return [
            (f"{block}.attn.{p}_proj.{kind}", t.contiguous())
            for p, t in zip("qkv", parts, strict=True)
        ]
    if module in LINEARS:
        value = tensor.t().contiguous() if kind == "weight" else tensor
        return [(f"{block}.{LINEARS[module]}.{kind}", value)]
    return None


FAMILY = Family(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    read_config=read_config,
    map_tensor=map_tensor,
)
