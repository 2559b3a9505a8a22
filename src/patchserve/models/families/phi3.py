"""Phi-3 (and Phi-4-mini): Llama with fused ``qkv_proj`` and ``gate_up_proj``, LongRoPE,
partial rotary, a sliding window on every layer.

LongRoPE is exact only within ``original_max_position_embeddings``: there ``transformers``
uses the short factors; past it, it recomputes every position with the long factors, which
a cached pass cannot follow. So the short factors are used, the model's context is that
limit, and the runtime refuses positions past it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from patchserve.models.config import (
    CheckpointError,
    ModelConfig,
    RopeConfig,
    make_rope,
    require,
    rope_parameters,
)
from patchserve.models.families.base import Family, Mapped, map_decoder_layout
from patchserve.models.families.llama import BLOCK_NAMES as LLAMA_BLOCK_NAMES


def _longrope(params: dict[str, Any], raw: dict[str, Any], head_dim: int) -> RopeConfig:
    """LongRoPE with its short factors and attention factor, as ``transformers``'
    ``_compute_longrope_parameters`` reads them. ``Phi3Config``'s top-level
    ``original_max_position_embeddings`` (default 4096) overrides the rope parameters' one."""
    rotary_dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
    original = raw.get("original_max_position_embeddings", 4096)
    if not isinstance(original, int) or original < 1:
        raise CheckpointError(
            f"config.json: original_max_position_embeddings must be a positive integer "
            f"for longrope, got {original!r}"
        )
    short = params.get("short_factor")
    if not isinstance(short, list) or len(short) != rotary_dim // 2:
        raise CheckpointError(
            f"config.json: longrope short_factor must list {rotary_dim // 2} numbers "
            f"(one per rotary frequency), got {short!r}"
        )
    factor = params.get("factor")
    if factor is None:
        factor = raw.get("max_position_embeddings", 4096) / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    scaling = (
        ("attention_factor", float(attention_factor)),
        ("original_max_position_embeddings", int(original)),
        ("rope_type", "longrope"),
        ("short_factor", tuple(float(f) for f in short)),
    )
    return RopeConfig(float(params["rope_theta"]), rotary_dim, scaling)


def _check_rows(name: str, tensor: torch.Tensor, rows: int) -> None:
    if tensor.dim() != 2 or tensor.shape[0] != rows:
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {rows} rows "
            f"from config.json"
        )


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    hidden = require(raw, "hidden_size")
    heads = require(raw, "num_attention_heads")
    layers = require(raw, "num_hidden_layers")
    head_dim = raw.get("head_dim") or hidden // heads
    params = rope_parameters(raw)
    if params.get("rope_type") in ("su", "yarn"):  # transformers' Phi3Config renames these
        params["rope_type"] = "longrope"
    context = raw.get("max_position_embeddings", 4096)
    if params.get("rope_type") == "longrope":
        rope = _longrope(params, raw, head_dim)
        limit = dict(rope.scaling or ())["original_max_position_embeddings"]
        context = min(context, limit)  # the honest context: positions past it are refused
    else:
        rope = make_rope(params, head_dim)
    window = raw.get("sliding_window")
    return ModelConfig(
        family="phi3",
        architecture=architecture,
        vocab_size=require(raw, "vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=require(raw, "intermediate_size"),
        norm_kind="rms",
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        activation=raw.get("hidden_act", "silu"),
        gated_mlp=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope=(rope,) * layers,
        sliding_windows=(window or None,) * layers,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=context,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )


def _map_block(layer: int, rest: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    """A tensor of block ``layer`` (``rest``: its name inside the block)."""
    block = f"blocks.{layer}"
    if rest == "self_attn.qkv_proj.weight":  # output rows [q; k; v]
        sizes = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        _check_rows(f"layers.{layer}.{rest}", tensor, sum(sizes))
        parts = tensor.split(sizes, dim=0)
        return [
            (f"{block}.attn.{p}_proj.weight", t.contiguous())
            for p, t in zip("qkv", parts, strict=True)
        ]
    if rest == "mlp.gate_up_proj.weight":  # Phi3MLP: gate, up = chunk(2), gate first
        _check_rows(f"layers.{layer}.{rest}", tensor, 2 * cfg.intermediate_size)
        gate, up = tensor.chunk(2, dim=0)
        return [
            (f"{block}.mlp.gate_proj.weight", gate.contiguous()),
            (f"{block}.mlp.up_proj.weight", up.contiguous()),
        ]
    target = LLAMA_BLOCK_NAMES.get(rest)
    return None if target is None else [(f"{block}.{target}", tensor)]


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    return map_decoder_layout(name, tensor, cfg, _map_block)


FAMILY = Family(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    read_config=read_config,
    map_tensor=map_tensor,
)
