"""OPT: learned positions offset by 2, LayerNorm, ReLU MLP; pre-LN (125m, 1.3b, ...) or
post-LN without a final norm (350m), and a narrower word embedding projected in and out
(``word_embed_proj_dim``, 350m)."""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import ModelConfig, require
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix

NAMES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.o_proj",
    # pre-LN: the branch inputs' norms; post-LN: the norms of the residual sums
    "self_attn_layer_norm": "attn_norm",
    "final_layer_norm": "mlp_norm",
    "fc1": "mlp.up_proj",
    "fc2": "mlp.down_proj",
}
SIMPLE = {
    "embed_tokens.weight": "embed_tokens.weight",
    "embed_positions.weight": "embed_positions.weight",
    "project_in.weight": "project_in.weight",
    "project_out.weight": "project_out.weight",
    "final_layer_norm.weight": "final_norm.weight",
    "final_layer_norm.bias": "final_norm.bias",
}
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding: position p reads row p + 2


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    embed = raw.get("word_embed_proj_dim") or hidden
    pre_ln = bool(raw.get("do_layer_norm_before", True))
    bias = bool(raw.get("enable_bias", True))
    affine = bool(raw.get("layer_norm_elementwise_affine", True))
    return ModelConfig(
        family="opt",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=require(raw, "ffn_dim"),
        norm_kind="layer" if affine else "layer_no_affine",
        norm_eps=1e-5,  # nn.LayerNorm's default: OPT's config has no epsilon
        activation=raw.get("activation_function", "relu"),
        gated_mlp=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=(None,) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=(hidden // heads) ** -0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        learned_positions=True,
        post_ln_residual=not pre_ln,
        # OPTDecoder: a final norm only before-norm, and not in checkpoints fine-tuned
        # before transformers 4.20.1 (_remove_final_layer_norm)
        final_norm=pre_ln and not raw.get("_remove_final_layer_norm", False),
        embed_dim=embed if embed != hidden else None,
        position_offset=POSITION_OFFSET,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    if name == "lm_head.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", tensor)]
    name = strip_prefix(name, ("model.decoder.", "decoder."))
    if name in SIMPLE:
        return [(SIMPLE[name], tensor)]
    split = split_layer(name, "layers.")
    if split is None:
        return None
    layer, rest = split
    module, _, kind = rest.rpartition(".")
    target = NAMES.get(module)
    return None if target is None else [(f"blocks.{layer}.{target}.{kind}", tensor)]


FAMILY = Family(
    name="opt",
    architectures=("OPTForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
