"""FLOP counts of the minimal computation of a sweep (multiply-adds count 2)."""

from __future__ import annotations

from patchserve.models.config import ModelConfig


def attention_proj_flops(cfg: ModelConfig) -> int:
    """q, k, v and output projections, per token."""
    d = cfg.hidden_size
    return 2 * (d * cfg.q_size + 2 * d * cfg.kv_size + cfg.q_size * d)


def mlp_flops(cfg: ModelConfig, layer: int) -> int:
    """The MLP of ``layer``, per token; a mixture-of-experts layer counts its router, the
    ``experts_per_token`` experts a token runs through and any shared expert with its gate."""
    d = cfg.hidden_size
    if layer not in cfg.moe_layers:
        return 2 * (3 if cfg.gated_mlp else 2) * d * cfg.intermediate_size
    routed = cfg.experts_per_token * 2 * 3 * d * cfg.moe_intermediate_size
    shared = 2 * 3 * d * cfg.shared_expert_size + 2 * d if cfg.shared_expert_size else 0
    return 2 * d * cfg.num_experts + routed + shared


def attention_score_flops(cfg: ModelConfig, layer: int, position: int) -> int:
    """QK^T and the weighted sum of V for one query at ``position``."""
    window = cfg.sliding_windows[layer]
    keys = position + 1 if window is None else min(position + 1, window)
    return 4 * cfg.num_heads * cfg.head_dim * keys


def unembed_flops(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size * cfg.vocab_size


def suffix_flops(
    cfg: ModelConfig, start_layer: int, first: int, length: int, reuse: str | None = None
) -> int:
    """The minimal work of one sweep row: blocks ``start_layer..L-1`` over positions
    ``first..length-1``, of which the final block needs keys and values for every
    position but queries, output projection and MLP for the last one only; plus
    one unembedding.

    ``reuse``: ``"attn_out"`` skips the first block's attention entirely,
    ``"attn_head"`` keeps only its output projection.
    """
    tokens = length - first
    d = cfg.hidden_size
    total = 0
    for layer in range(start_layer, cfg.num_layers):
        final = layer == cfg.num_layers - 1
        queries = range(length - 1, length) if final else range(first, length)
        if layer == start_layer and reuse is not None:
            if reuse == "attn_head":
                total += len(queries) * 2 * cfg.q_size * d
        else:
            total += tokens * 2 * d * 2 * cfg.kv_size
            total += len(queries) * 2 * (d * cfg.q_size + cfg.q_size * d)
            total += sum(attention_score_flops(cfg, layer, p) for p in queries)
        total += len(queries) * mlp_flops(cfg, layer)
    return total + unembed_flops(cfg)


def full_forward_flops(cfg: ModelConfig, length: int) -> int:
    """Every block over every position, logits at the last one (the usual full forward)."""
    layers = range(cfg.num_layers)
    total = length * sum(attention_proj_flops(cfg) + mlp_flops(cfg, layer) for layer in layers)
    total += sum(
        attention_score_flops(cfg, layer, p)
        for layer in range(cfg.num_layers)
        for p in range(length)
    )
    return total + unembed_flops(cfg)
