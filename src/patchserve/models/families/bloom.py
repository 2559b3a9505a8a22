"""BLOOM: ALiBi attention, LayerNorm on the embeddings, fused per-head QKV, tied unembedding.

BLOOM's attention and MLP modules add the residual themselves; their branch outputs
(``self_attention.dense``, ``mlp.dense_4h_to_h``, bias included) are our ``attn_out`` and
``mlp_out``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from patchserve.models.config import CheckpointError, ModelConfig, require
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix

NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "self_attention.dense": "attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """ALiBi's per-head slopes in float32, as ``transformers`` computes them (a geometric
    series for the largest power of two of heads, the odd powers of the next one for the rest)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        powers = torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32)
        slopes = torch.cat((slopes, torch.pow(extra, powers)))
    return tuple(float(s) for s in slopes)


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    if raw.get("apply_residual_connection_post_layernorm"):
        raise CheckpointError(
            "config.json apply_residual_connection_post_layernorm=true: the residual stream "
            "would restart from the normalised input in every block, which breaks "
            "post_attn = pre_attn + attn_out; not supported"
        )
    if int(raw.get("pretraining_tp", 1)) > 1 and raw.get("slow_but_exact"):
        raise CheckpointError(
            "config.json slow_but_exact=true with pretraining_tp>1: transformers then drops the "
            "dense and dense_4h_to_h biases; not supported"
        )
    hidden = require(raw, "hidden_size", "n_embed")
    heads = require(raw, "num_attention_heads", "n_head")
    layers = require(raw, "num_hidden_layers", "n_layer")
    head_dim = hidden // heads
    if head_dim * heads != hidden:
        raise CheckpointError(f"config.json hidden_size {hidden} is not divisible by {heads} heads")
    return ModelConfig(
        family="bloom",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=4 * hidden,  # BloomMLP ignores n_inner
        norm_kind="layer",
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        activation="gelu_pytorch_tanh",  # bloom_gelu: the tanh approximation
        gated_mlp=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=(None,) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=head_dim**-0.5,
        # ALiBi has no hard limit; the training context is the usable one.
        max_position_embeddings=raw.get("max_position_embeddings") or raw.get("seq_length") or 2048,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        alibi_slopes=alibi_slopes(heads),
        embed_norm=True,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def split_fused_qkv(block: str, kind: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped:
    """A fused ``query_key_value`` whose output rows are laid out [head, (q, k, v), head_dim]."""
    h, d = cfg.num_heads, cfg.head_dim
    fused = tensor.reshape(h, 3, d, *tensor.shape[1:])
    return [
        (
            f"{block}.attn.{p}_proj.{kind}",
            fused[:, i].reshape(h * d, *tensor.shape[1:]).contiguous(),
        )
        for i, p in enumerate("qkv")
    ]


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    if name == "lm_head.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", tensor)]
    name = strip_prefix(name, ("transformer.",))
    if name == "word_embeddings.weight":
        return [("embed_tokens.weight", tensor)]
    if name.startswith("word_embeddings_layernorm."):
        return [("embed_norm." + name.rpartition(".")[2], tensor)]
    if name.startswith("ln_f."):
        return [("final_norm." + name.rpartition(".")[2], tensor)]
    split = split_layer(name, "h.")
    if split is None:
        return None
    layer, rest = split
    module, _, kind = rest.rpartition(".")
    block = f"blocks.{layer}"
    if module == "self_attention.query_key_value":
        return split_fused_qkv(block, kind, tensor, cfg)
    if module in NAMES:
        return [(f"{block}.{NAMES[module]}.{kind}", tensor)]
    return None


FAMILY = Family(
    name="bloom",
    architectures=("BloomForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
