"""OLMo, OLMo-2 and OLMo-3 (AllenAI).

OLMo: Llama's layout with parameter-free LayerNorms and q/k/v clipping
(``clip_qkv``). OLMo-2: no pre-norms — each branch reads the residual and its
output is RMS-normalised before it is added — and q/k norms over the full
q/k width, before the split into heads. OLMo-3: OLMo-2 with sliding-window
layers (``layer_types``) and a rope per layer type.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from patchserve.models.config import (
    CheckpointError,
    ModelConfig,
    RopeConfig,
    layer_windows,
    make_rope,
    require,
    rope_parameters,
)
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix
from patchserve.models.families.llama import BLOCK_NAMES as LLAMA_BLOCK_NAMES

# OLMo's LayerNorms have no tensors; only the projections are named (as in Llama).
OLMO_BLOCK_NAMES = {k: v for k, v in LLAMA_BLOCK_NAMES.items() if "norm" not in k}
OLMO2_BLOCK_NAMES = {
    **OLMO_BLOCK_NAMES,
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "post_attention_layernorm.weight": "attn_post_norm.weight",
    "post_feedforward_layernorm.weight": "mlp_post_norm.weight",
}
OLMO_LAYER_NORM_EPS = 1e-5  # transformers' OlmoLayerNorm: fixed, not in config.json
OLMO3_ROPE_THETA = 500000.0  # Olmo3Config.default_theta
OLMO3_WINDOW = 4096  # Olmo3Config.sliding_window


def _olmo3_layer_types(raw: dict[str, Any], layers: int) -> list[str]:
    """``layer_types``, else Olmo3Config's default: every fourth layer global."""
    types = raw.get("layer_types")
    if types:
        return list(types)
    return ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(layers)]


def _olmo3_rope(raw: dict[str, Any], layer_type: str, head_dim: int) -> RopeConfig:
    """The rope of one OLMo-3 layer type: 5.x ``rope_parameters`` per type, or the 4.x
    spelling, whose ``rope_scaling`` applies to the global layers only."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:
        return make_rope(rope_parameters(raw, layer_type), head_dim)
    if params is not None:
        raise CheckpointError(f"config.json rope_parameters lacks an entry for {layer_type}")
    theta = float(raw.get("rope_theta", OLMO3_ROPE_THETA))
    if theta != OLMO3_ROPE_THETA:
        # transformers gives it to the global layers only (the sliding ones keep the default)
        raise CheckpointError(
            f"config.json rope_theta {theta}: ambiguous for OLMo-3's sliding layers "
            f"(transformers keeps {OLMO3_ROPE_THETA} there); spell it in rope_parameters"
        )
    if layer_type == "sliding_attention":
        return make_rope({"rope_type": "default", "rope_theta": theta}, head_dim)
    return make_rope({**rope_parameters(raw), "rope_theta": theta}, head_dim)


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    olmo3 = architecture == "Olmo3ForCausalLM"
    olmo2 = olmo3 or architecture == "Olmo2ForCausalLM"
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = raw.get("head_dim") or hidden // heads
    if olmo3:
        types = _olmo3_layer_types(raw, layers)
        rope = tuple(_olmo3_rope(raw, t, head_dim) for t in types)
        window = raw.get("sliding_window", OLMO3_WINDOW)
        if window is None and "sliding_attention" in types:
            raise CheckpointError("config.json sliding_window is null but layer_types slides")
        windows = layer_windows({**raw, "layer_types": types, "sliding_window": window}, layers)
    else:
        rope = (make_rope(rope_parameters(raw), head_dim),) * layers
        windows = (None,) * layers
    # transformers keeps OLMo's cos/sin in float32 and rotates q/k in float32.
    rope = tuple(replace(r, tables_float32=True) for r in rope)
    clip = raw.get("clip_qkv")
    if clip is not None and olmo2:  # transformers ignores it: its meaning is unclear
        raise CheckpointError(f"config.json clip_qkv {clip!r}: {architecture} has no clipping")
    if clip is not None and not float(clip) > 0:
        raise CheckpointError(f"config.json clip_qkv {clip!r} must be positive")
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(
        family="olmo3" if olmo3 else "olmo2" if olmo2 else "olmo",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(raw, "intermediate_size"),
        norm_kind="rms_float" if olmo2 else "layer_plain",
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)) if olmo2 else OLMO_LAYER_NORM_EPS,
        activation=raw.get("hidden_act", "silu"),
        gated_mlp=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=rope,
        sliding_windows=windows,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=olmo2,
        post_attn_norm=olmo2,
        post_mlp_norm=olmo2,
        pre_norms=not olmo2,
        qk_norm_full_width=olmo2,
        clip_qkv=None if clip is None else float(clip),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    if name == "lm_head.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", tensor)]
    name = strip_prefix(name, ("model.",))
    if name == "embed_tokens.weight":
        return [("embed_tokens.weight", tensor)]
    olmo2 = cfg.family in ("olmo2", "olmo3")
    if name == "norm.weight" and olmo2:
        return [("final_norm.weight", tensor)]
    if name.endswith("rotary_emb.inv_freq"):
        return []
    split = split_layer(name, "layers.")
    if split is None:
        return None
    layer, rest = split
    names = OLMO2_BLOCK_NAMES if olmo2 else OLMO_BLOCK_NAMES
    target = names.get(rest)
    return None if target is None else [(f"blocks.{layer}.{target}", tensor)]


FAMILY = Family(
    name="olmo",
    architectures=("OlmoForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"),
    read_config=read_config,
    map_tensor=map_tensor,
)
