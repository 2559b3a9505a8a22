"""Mixture-of-experts Llama-style families: Mixtral, Qwen2-MoE (qkv bias, a shared expert),
Qwen3-MoE (q/k norm). Attention, norms and rope are Llama's; the MLPs of the MoE layers are
top-k routed experts (``models/moe.py``), the others (``mlp_only_layers``,
``decoder_sparse_step``) dense.

Experts are read as ``transformers`` saves them (one tensor per expert:
``experts.E.w1/w3/w2`` for Mixtral, ``experts.E.gate/up/down_proj`` for Qwen) or fused
as ``transformers`` 5.x holds them in memory (``experts.gate_up_proj``
``[experts, 2 * I, d]``, gate rows first, and ``experts.down_proj`` ``[experts, d, I]``),
split into the runtime's per-expert projections.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from patchserve.models.config import CheckpointError, ModelConfig, require
from patchserve.models.families import llama
from patchserve.models.families.base import Family, Mapped, split_layer, strip_prefix

MIXTRAL = "MixtralForCausalLM"
QWEN2_MOE = "Qwen2MoeForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Checkpoint names inside an MoE block (after ``mlp.``) → runtime names inside ``mlp.``.
MOE_NAMES = {
    "gate.weight": "router.weight",
    "shared_expert_gate.weight": "shared_expert_gate.weight",
    **{f"shared_expert.{p}.weight": f"shared_expert.{p}.weight" for p in PROJECTIONS},
}
# Per-expert projection names → the runtime's (Mixtral's w1/w3/w2 are gate/up/down).
EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"} | {p: p for p in PROJECTIONS}


def _moe_layers(
    raw: dict[str, Any], architecture: str, layers: int, experts: int
) -> tuple[int, ...]:
    """The layers whose MLP is routed: Mixtral all; Qwen every ``decoder_sparse_step``-th
    layer not in ``mlp_only_layers`` (none without experts)."""
    if architecture == MIXTRAL:
        return tuple(range(layers))
    step = raw.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise CheckpointError(
            f"config.json decoder_sparse_step {step!r} must be a positive integer"
        )
    dense = set(raw.get("mlp_only_layers") or [])
    return tuple(i for i in range(layers) if experts > 0 and i not in dense and (i + 1) % step == 0)


def _windows(raw: dict[str, Any], architecture: str, layers: int) -> tuple[int | None, ...]:
    """Sliding windows as ``transformers`` 5.x applies them: Mixtral ``sliding_window`` on
    every layer; Qwen3-MoE the same when ``use_sliding_window``; Qwen2-MoE the layers
    ``layer_types`` marks sliding (by default the even layers below ``max_window_layers``)."""
    window = raw.get("sliding_window") or None
    if architecture == MIXTRAL:
        return (window,) * layers
    use = bool(raw.get("use_sliding_window", False))
    if architecture == QWEN3_MOE:
        return (window if use else None,) * layers
    types = raw.get("layer_types") or [
        "sliding_attention"
        if i % 2 == 0 and i < raw.get("max_window_layers", 28) and use
        else "full_attention"
        for i in range(layers)
    ]
    if len(types) != layers:
        raise CheckpointError("config.json layer_types does not have one entry per layer")
    sliding = [t == "sliding_attention" for t in types]
    if any(sliding) and not (use and window):
        raise CheckpointError(
            "config.json layer_types marks sliding layers but use_sliding_window / "
            "sliding_window give them no window"
        )
    return tuple(window if s else None for s in sliding)


def _num_experts(raw: dict[str, Any], qwen2: bool) -> int:
    """``num_experts`` (Qwen2-MoE), else ``num_local_experts`` (Mixtral, Qwen3-MoE: 5.x
    writes that name, earlier checkpoints the other, which 5.x reads as an alias)."""
    if qwen2:
        return int(require(raw, "num_experts"))
    names = ("num_local_experts", "num_experts")
    given = {raw[k] for k in names if raw.get(k) is not None}
    if len(given) > 1:
        raise CheckpointError(f"config.json num_local_experts and num_experts differ: {given}")
    return int(require(raw, *names))


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    base = llama.read_config(raw, architecture)
    mixtral, qwen2 = architecture == MIXTRAL, architecture == QWEN2_MOE
    experts = _num_experts(raw, qwen2)
    moe_layers = _moe_layers(raw, architecture, base.num_layers, experts)
    top_k = int(require(raw, "num_experts_per_tok")) if moe_layers else 0
    if moe_layers and not 0 < top_k <= experts:
        raise CheckpointError(
            f"config.json num_experts_per_tok {top_k} must be in 1..{experts} (the experts)"
        )
    bias = bool(raw.get("attention_bias", False))
    return dataclasses.replace(
        base,
        family=raw.get("model_type") or architecture,
        sliding_windows=_windows(raw, architecture, base.num_layers),
        qkv_bias=bool(raw.get("qkv_bias", True)) if qwen2 else bias,
        o_bias=False if qwen2 else bias,
        qk_norm=architecture == QWEN3_MOE,
        moe_layers=moe_layers,
        num_experts=experts,
        experts_per_token=top_k,
        norm_topk_prob=mixtral or bool(raw.get("norm_topk_prob", False)),
        moe_intermediate_size=int(
            require(raw, "intermediate_size" if mixtral else "moe_intermediate_size")
        ),
        shared_expert_size=int(raw.get("shared_expert_intermediate_size") or 0) if qwen2 else 0,
        moe_weights_model_dtype=not mixtral,
    )


def _fused(rest: str, tensor: torch.Tensor, prefix: str) -> Mapped | None:
    """Fused expert tensors ``experts.gate_up_proj`` / ``experts.down_proj`` split per expert."""
    if rest == "experts.gate_up_proj":
        gate, up = tensor.chunk(2, dim=1)
        return [
            *((f"{prefix}experts.{e}.gate_proj.weight", g) for e, g in enumerate(gate)),
            *((f"{prefix}experts.{e}.up_proj.weight", u) for e, u in enumerate(up)),
        ]
    if rest == "experts.down_proj":
        return [(f"{prefix}experts.{e}.down_proj.weight", w) for e, w in enumerate(tensor)]
    return None


def _moe_tensor(rest: str, tensor: torch.Tensor, prefix: str) -> Mapped | None:
    """A tensor of an MoE block (``rest`` after ``mlp.`` / ``block_sparse_moe.``)."""
    if rest in MOE_NAMES:
        return [(prefix + MOE_NAMES[rest], tensor)]
    parts = rest.split(".")
    if len(parts) == 4 and parts[0] == "experts" and parts[1].isdigit() and parts[3] == "weight":
        target = EXPERT_NAMES.get(parts[2])
        return None if target is None else [(f"{prefix}experts.{parts[1]}.{target}.weight", tensor)]
    return _fused(rest, tensor, prefix)


def map_tensor(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Mapped | None:
    split = split_layer(strip_prefix(name, ("model.",)), "layers.")
    if split is not None and split[0] in cfg.moe_layers:
        layer, rest = split
        for block in ("mlp.", "block_sparse_moe."):
            if rest.startswith(block):
                return _moe_tensor(rest[len(block) :], tensor, f"blocks.{layer}.mlp.")
    return llama.map_tensor(name, tensor, cfg)


FAMILY = Family(
    name="moe",
    architectures=(MIXTRAL, QWEN2_MOE, QWEN3_MOE),
    read_config=read_config,
    map_tensor=map_tensor,
)
