"""GPT-Neo: learned positions, LayerNorm, global and local (sliding-window) attention
layers, unscaled attention scores, q/k/v without bias, MLP as ``nn.Linear``."""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import CheckpointError, ModelConfig, require
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix

NAMES = {
    "ln_1": "attn_norm",
    "ln_2": "mlp_norm",
    "attn.attention.q_proj": "attn.q_proj",
    "attn.attention.k_proj": "attn.k_proj",
    "attn.attention.v_proj": "attn.v_proj",
    "attn.attention.out_proj": "attn.o_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
IGNORED = ("attn.attention.bias", "attn.attention.masked_bias")  # cached masks
ATTENTION_TYPES = ("global", "local")


def attention_layers(raw: dict[str, Any], layers: int) -> list[str]:
    """``"global"`` / ``"local"`` per layer: ``attention_layers``, else ``attention_types``
    expanded as transformers does (``[[["global", "local"], 12]]`` → 24 alternating)."""
    types = raw.get("attention_layers")
    if not types:
        spec = raw.get("attention_types") or [[["global", "local"], 12]]
        types = [t for kinds, repeat in spec for _ in range(repeat) for t in kinds]
    if len(types) != layers:
        raise CheckpointError(
            f"config.json attention_types gives {len(types)} layers, num_layers is {layers}"
        )
    unknown = sorted(set(types) - set(ATTENTION_TYPES))
    if unknown:
        raise CheckpointError(
            f"unsupported GPT-Neo attention type(s) {unknown}; supported: global, local"
        )
    return list(types)


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size", "n_embd")
    heads = require(raw, "num_heads", "num_attention_heads")
    layers = require(raw, "num_layers", "num_hidden_layers")
    window = int(raw.get("window_size", 256))  # transformers' default
    types = attention_layers(raw, layers)
    return ModelConfig(
        family="gpt_neo",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=raw.get("intermediate_size") or 4 * hidden,
        norm_kind="layer",
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        activation=raw.get("activation_function", "gelu_new"),
        gated_mlp=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=(None,) * layers,
        # local: token i attends to j with 0 <= i - j < window_size (transformers'
        # tril(ones) xor tril(ones, -window_size))
        sliding_windows=tuple(window if t == "local" else None for t in types),
        attn_scale=1.0,  # GPT-Neo does not scale its attention scores
        max_position_embeddings=require(raw, "max_position_embeddings"),
        qkv_bias=False,
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
    if rest in IGNORED:
        return []
    module, _, kind = rest.rpartition(".")
    target = NAMES.get(module)
    return None if target is None else [(f"blocks.{layer}.{target}.{kind}", tensor)]


FAMILY = Family(
    name="gpt_neo",
    architectures=("GPTNeoForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
