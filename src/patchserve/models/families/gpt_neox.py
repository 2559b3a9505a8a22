"""GPT-NeoX / Pythia: parallel (or sequential) residual, partial rotary, fused per-head QKV."""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import ModelConfig, make_rope, require, rope_parameters
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix

NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "attention.dense": "attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}
IGNORED = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = hidden // heads
    rope = make_rope(rope_parameters(raw), head_dim)
    bias = bool(raw.get("attention_bias", True))
    return ModelConfig(
        family="gpt_neox",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=require(raw, "intermediate_size"),
        norm_kind="layer",
        norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
        activation=raw.get("hidden_act", "gelu"),
        gated_mlp=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=(rope,) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        parallel_residual=bool(raw.get("use_parallel_residual", True)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    if name == "embed_out.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", tensor)]
    name = strip_prefix(name, ("gpt_neox.",))
    if name == "embed_in.weight":
        return [("embed_tokens.weight", tensor)]
    if name.startswith("final_layer_norm."):
        return [("final_norm." + name.rpartition(".")[2], tensor)]
    split = split_layer(name, "layers.")
    if split is None:
        return None
    layer, rest = split
    if rest in IGNORED:
        return []
    module, _, kind = rest.rpartition(".")
    block = f"blocks.{layer}"
    if module == "attention.query_key_value":
        # Output rows are laid out [head, (q, k, v), head_dim].
        h, d = cfg.num_heads, cfg.head_dim
        fused = tensor.reshape(h, 3, d, *tensor.shape[1:])
        return [
            (
                f"{block}.attn.{p}_proj.{kind}",
                fused[:, i].reshape(h * d, *tensor.shape[1:]).contiguous(),
            )
            for i, p in enumerate("qkv")
        ]
    if module in NAMES:
        return [(f"{block}.{NAMES[module]}.{kind}", tensor)]
    return None


FAMILY = Family(
    name="gpt_neox",
    architectures=("GPTNeoXForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
