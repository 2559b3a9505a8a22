"""Falcon: rotary or ALiBi, multi-query or grouped (new decoder architecture) attention,
parallel or sequential blocks, one fused ``query_key_value`` in three layouts.

Norms: a sequential block has ``input_layernorm`` and ``post_attention_layernorm``; a parallel
one ``ln_attn`` and ``ln_mlp`` (new decoder architecture, ``num_ln_in_parallel_attn`` 2) or
one ``input_layernorm`` read by both branches, loaded as both our ``attn_norm`` and
``mlp_norm`` (the same weights, so ``mlp_in`` is the attention's normalised input).
"""

from __future__ import annotations

from typing import Any

import torch

from patchserve.models.config import (
    CheckpointError,
    ModelConfig,
    make_rope,
    require,
    rope_parameters,
)
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix
from patchserve.models.families.bloom import alibi_slopes, split_fused_qkv

MLP_NAMES = {"mlp.dense_h_to_4h": "mlp.up_proj", "mlp.dense_4h_to_h": "mlp.down_proj"}
# extra["falcon_norms"] → checkpoint norm name → our norms
NORMS: dict[str, dict[str, tuple[str, ...]]] = {
    "sequential": {"input_layernorm": ("attn_norm",), "post_attention_layernorm": ("mlp_norm",)},
    "shared": {"input_layernorm": ("attn_norm", "mlp_norm")},
    "two": {"ln_attn": ("attn_norm",), "ln_mlp": ("mlp_norm",)},
}


def _layout(raw: dict[str, Any], heads: int) -> tuple[str, int, str]:
    """(fused qkv layout, kv heads, norms) of a Falcon config; refuses what transformers
    itself cannot run."""
    new = bool(raw.get("new_decoder_architecture", False))
    parallel = bool(raw.get("parallel_attn", True))
    num_ln = raw.get("num_ln_in_parallel_attn")
    kv = int(raw.get("num_kv_heads") or heads)
    if new:
        if not parallel:
            raise CheckpointError(
                "config.json new_decoder_architecture=true with parallel_attn=false: "
                "transformers' Falcon cannot run this block; not supported"
            )
        if heads % kv:
            raise CheckpointError(f"config.json num_kv_heads {kv} does not divide {heads} heads")
        return "grouped", kv, "shared" if num_ln == 1 else "two"
    if parallel and num_ln == 2:
        raise CheckpointError(
            "config.json num_ln_in_parallel_attn=2 needs new_decoder_architecture=true "
            "(transformers' Falcon cannot run it otherwise); not supported"
        )
    norms = "shared" if parallel else "sequential"
    if raw.get("multi_query", True):
        return "multi_query", 1, norms
    if kv != heads:
        raise CheckpointError(
            f"config.json num_kv_heads {kv} != num_attention_heads {heads} without "
            "multi_query or new_decoder_architecture: the fused query_key_value has one k and v "
            "per head; not supported"
        )
    return "per_head", heads, norms


def _bfloat16_slopes(heads: int) -> tuple[float, ...]:
    """ALiBi's slopes rounded to bfloat16, as Falcon's ``build_alibi_tensor`` rounds them."""
    return tuple(float(s) for s in torch.tensor(alibi_slopes(heads)).bfloat16().float())


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size", "n_embed")
    heads = require(raw, "num_attention_heads", "n_head")
    layers = require(raw, "num_hidden_layers", "n_layer")
    head_dim = hidden // heads
    if head_dim * heads != hidden:
        raise CheckpointError(f"config.json hidden_size {hidden} is not divisible by {heads} heads")
    qkv, kv, norms = _layout(raw, heads)
    alibi = bool(raw.get("alibi", False))
    rope = None if alibi else make_rope(rope_parameters(raw), head_dim)
    bias = bool(raw.get("bias", False))
    return ModelConfig(
        family="falcon",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=raw.get("ffn_hidden_size") or 4 * hidden,
        norm_kind="layer",
        norm_eps=float(raw.get("layer_norm_epsilon") or 1e-5),
        activation=raw.get("activation") or "gelu",
        gated_mlp=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=(rope,) * layers,
        sliding_windows=(None,) * layers,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=raw.get("max_position_embeddings") or 2048,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        parallel_residual=norms != "sequential",
        # Falcon's ALiBi: bfloat16 slopes times positions in bfloat16, over sqrt(head_dim).
        alibi_slopes=_bfloat16_slopes(heads) if alibi else None,
        alibi_dtype="bfloat16",
        alibi_scale=head_dim**-0.5,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        extra={"falcon_qkv": qkv, "falcon_norms": norms},
    )


def _split_qkv(block: str, kind: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped:
    """The fused ``query_key_value`` rows → q/k/v: [head, (q, k, v), d] (``per_head``),
    [q heads, k, v] × d (``multi_query``) or [kv group, (its q heads, k, v), d] (``grouped``)."""
    layout = cfg.extra["falcon_qkv"]
    if layout == "per_head":
        return split_fused_qkv(block, kind, tensor, cfg)
    h, kv, d, rest = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, tensor.shape[1:]
    grouped = tensor.reshape(kv, -1, d, *rest)  # multi_query: one group of h + 2
    parts = (grouped[:, :-2], grouped[:, -2], grouped[:, -1])
    sizes = (h * d, kv * d, kv * d)
    return [
        (f"{block}.attn.{p}_proj.{kind}", t.reshape(n, *rest).contiguous())
        for p, t, n in zip("qkv", parts, sizes, strict=True)
    ]


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    if name == "lm_head.weight":
        return [] if cfg.tie_word_embeddings else [("lm_head.weight", tensor)]
    name = strip_prefix(name, ("transformer.",))
    if name == "word_embeddings.weight":
        return [("embed_tokens.weight", tensor)]
    if name.startswith("ln_f."):
        return [("final_norm." + name.rpartition(".")[2], tensor)]
    split = split_layer(name, "h.")
    if split is None:
        return None
    layer, rest = split
    module, _, kind = rest.rpartition(".")
    block = f"blocks.{layer}"
    norms = NORMS[cfg.extra["falcon_norms"]]
    if module in norms:
        return [(f"{block}.{target}.{kind}", tensor) for target in norms[module]]
    if module == "self_attention.query_key_value":
        return _split_qkv(block, kind, tensor, cfg)
    if module == "self_attention.dense":
        return [(f"{block}.attn.o_proj.{kind}", tensor)]
    if module in MLP_NAMES:
        return [(f"{block}.{MLP_NAMES[module]}.{kind}", tensor)]
    return None


FAMILY = Family(
    name="falcon",
    architectures=("FalconForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
