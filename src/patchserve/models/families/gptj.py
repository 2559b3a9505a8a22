"""GPT-J: parallel residual reading ONE ``ln_1`` (mapped onto both branch norms),
interleaved rotary over ``rotary_dim`` channels, bias-free attention, ``lm_head`` with bias."""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import CheckpointError, ModelConfig, RopeConfig, require
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix

NAMES = {
    "attn.q_proj": "attn.q_proj",
    "attn.k_proj": "attn.k_proj",
    "attn.v_proj": "attn.v_proj",
    "attn.out_proj": "attn.o_proj",
    "mlp.fc_in": "mlp.up_proj",
    "mlp.fc_out": "mlp.down_proj",
}
IGNORED = ("attn.bias", "attn.masked_bias")  # cached causal masks in old checkpoints
GPTJ_THETA = 10000.0  # fixed in transformers' GPT-J (create_sinusoidal_positions)


def _rotary_dim(raw: dict[str, Any], hidden: int, head_dim: int) -> int:
    """``rotary_dim`` (transformers: all of ``hidden_size`` when unset), which must fit a head."""
    rotary_dim = raw.get("rotary_dim") or hidden
    if rotary_dim > head_dim or rotary_dim % 2:
        raise CheckpointError(
            f"config.json rotary_dim {raw.get('rotary_dim')!r}: rotary must cover an even number "
            f"of channels of one head (head_dim {head_dim}); transformers cannot run it either"
        )
    return int(rotary_dim)


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "n_embd", "hidden_size")
    heads = require(raw, "n_head", "num_attention_heads")
    layers = require(raw, "n_layer", "num_hidden_layers")
    head_dim = hidden // heads
    rope = RopeConfig(GPTJ_THETA, _rotary_dim(raw, hidden, head_dim), interleaved=True)
    return ModelConfig(
        family="gptj",
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
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=(rope,) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=require(raw, "n_positions", "max_position_embeddings"),
        mlp_bias=True,
        parallel_residual=True,
        lm_head_bias=True,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    if name == "lm_head.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", tensor)]
    if name == "lm_head.bias":
        return [("lm_head.bias", tensor)]
    name = strip_prefix(name, ("transformer.",))
    if name == "wte.weight":
        return [("embed_tokens.weight", tensor)]
    if name.startswith("ln_f."):
        return [("final_norm." + name.rpartition(".")[2], tensor)]
    split = split_layer(name, "h.")
    if split is None:
        return None
    layer, rest = split
    if rest in IGNORED:
        return []
    module, _, kind = rest.rpartition(".")
    block = f"blocks.{layer}"
    if module == "ln_1":  # both branches read the same normalised input
        return [(f"{block}.attn_norm.{kind}", tensor), (f"{block}.mlp_norm.{kind}", tensor)]
    if module in NAMES:
        return [(f"{block}.{NAMES[module]}.{kind}", tensor)]
    return None


FAMILY = Family(
    name="gptj",
    architectures=("GPTJForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
