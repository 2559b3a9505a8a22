"""A plain, padded, unoptimised forward of every supported family: read this one first.

Same weights, same hook sites, none of the runtime's machinery — no key/value
cache, no packed rows, no resumed blocks, no narrowing to the last token, no
SDPA: attention is a softmax over an explicit causal (and sliding-window)
mask, as in a textbook. It is the oracle the optimised
:class:`~patchserve.models.Transformer` and the sweep engine are tested
against (it shares only the norm, MLP and rope-frequency building blocks of
``layers.py``), and it equals ``transformers`` for every family.

``edit(layer, hook, activation) -> activation`` sees every site in order
(``pre_attn``, ``attn_head`` ``[b, t, heads, head_dim]``, ``attn_out``,
``post_attn``, ``mlp_in``, ``mlp_out``, ``post_block``, each ``[b, t, ...]``)
and may return a patched activation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from patchserve.models.block import DecoderBlock
from patchserve.models.layers import MLP, activation, rope_inv_freq, rotate_half
from patchserve.models.moe import MoE
from patchserve.models.transformer import Transformer

Edit = Callable[[int, str, torch.Tensor], torch.Tensor]


def _blocks(model: Transformer) -> list[DecoderBlock]:
    return [cast(DecoderBlock, block) for block in model.blocks]


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = x @ module.weight.T
    return out + module.bias if module.bias is not None else out


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the first ``2 * len(inv_freq)`` channels of ``x`` [b, t, h, d]."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]  # [t, rd/2]
    emb = torch.cat((angles, angles), dim=-1)  # [t, rd]
    cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
    rd = emb.shape[-1]
    rotated = x[..., :rd] * cos + rotate_half(x[..., :rd]) * sin
    return torch.cat((rotated, x[..., rd:]), dim=-1)


def _attention(model: Transformer, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Per-head outputs ``[b, t, heads, head_dim]`` of the normalised residual ``x``."""
    cfg, attn = model.cfg, _blocks(model)[layer].attn
    b, t, _ = x.shape
    q = _linear(attn.q_proj, x).view(b, t, cfg.num_heads, cfg.head_dim)
    k = _linear(attn.k_proj, x).view(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = _linear(attn.v_proj, x).view(b, t, cfg.num_kv_heads, cfg.head_dim)
    if attn.q_norm is not None and attn.k_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    rope = cfg.rope[layer]
    if rope is not None:
        positions, inv_freq = torch.arange(t, device=x.device), rope_inv_freq(rope).to(x.device)
        q, k = _rotate(q, positions, inv_freq), _rotate(k, positions, inv_freq)
    group = cfg.num_heads // cfg.num_kv_heads  # grouped-query attention: share each kv head
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.scale
    if cfg.attn_softcap is not None:
        scores = torch.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    i = torch.arange(t, device=x.device)
    allowed = i[None, :] <= i[:, None]  # causal
    window = cfg.sliding_windows[layer]
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _mlp(model: Transformer, layer: int, x: torch.Tensor) -> torch.Tensor:
    cfg, mlp = model.cfg, cast(MLP, _blocks(model)[layer].mlp)
    act = activation(cfg.activation)
    if mlp.gate_proj is not None:
        return _linear(mlp.down_proj, act(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))
    return _linear(mlp.down_proj, act(_linear(mlp.up_proj, x)))


def _gated(mlp: MLP, act: Callable, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP (a routed or the shared expert): ``down(act(gate(x)) * up(x))``."""
    assert mlp.gate_proj is not None
    return _linear(mlp.down_proj, act(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _moe(model: Transformer, layer: int, x: torch.Tensor) -> torch.Tensor:
    """A mixture-of-experts MLP: each token's top-k experts by the router's softmax,
    weighted (renormalised when ``norm_topk_prob``), plus a sigmoid-gated shared expert."""
    cfg, moe = model.cfg, cast(MoE, _blocks(model)[layer].mlp)
    act = activation(cfg.activation)
    probs = torch.softmax(_linear(moe.router, x).float(), dim=-1)  # [b, t, experts]
    top_probs, top_experts = probs.topk(cfg.experts_per_token, dim=-1)
    if cfg.norm_topk_prob:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    if cfg.moe_weights_model_dtype:
        top_probs = top_probs.to(x.dtype)
    rows = []
    for b in range(x.shape[0]):
        tokens = []
        for t in range(x.shape[1]):
            out = torch.zeros_like(x[b, t])
            for weight, expert in zip(top_probs[b, t], top_experts[b, t].tolist(), strict=True):
                expert_mlp = cast(MLP, moe.experts[expert])
                out = out + (weight * _gated(expert_mlp, act, x[b, t])).to(x.dtype)
            tokens.append(out)
        rows.append(torch.stack(tokens))
    routed = torch.stack(rows)
    if moe.shared_expert is None or moe.shared_expert_gate is None:
        return routed
    gate = torch.sigmoid(_linear(moe.shared_expert_gate, x))
    return routed + gate * _gated(moe.shared_expert, act, x)


@torch.inference_mode()
def reference_forward(
    model: Transformer, input_ids: torch.Tensor, edit: Edit | None = None
) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
    """Logits ``[b, t, vocab]`` of ``input_ids`` ``[b, t]`` and every site's activation."""
    cfg = model.cfg
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def site(layer: int, hook: str, value: torch.Tensor) -> torch.Tensor:
        if edit is not None:
            value = edit(layer, hook, value)
        captured[layer, hook] = value
        return value

    x: torch.Tensor = model.embed_tokens.weight[input_ids]
    if cfg.embed_scale is not None:
        x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
    if model.embed_positions is not None:
        x = x + model.embed_positions.weight[: input_ids.shape[1]]
    for layer, block in enumerate(_blocks(model)):
        x = site(layer, "pre_attn", x)
        z = site(layer, "attn_head", _attention(model, layer, block.attn_norm(x)))
        a = _linear(block.attn.o_proj, z.flatten(-2))
        a = site(layer, "attn_out", block.attn_post_norm(a) if block.attn_post_norm else a)
        h = site(layer, "post_attn", x + a)
        m_in = site(layer, "mlp_in", block.mlp_norm(x if cfg.parallel_residual else h))
        m = (_moe if layer in cfg.moe_layers else _mlp)(model, layer, m_in)
        m = site(layer, "mlp_out", block.mlp_post_norm(m) if block.mlp_post_norm else m)
        x = site(layer, "post_block", h + m)
    logits = _linear(model.lm_head, model.final_norm(x))
    if cfg.logit_scale is not None:
        logits = logits * cfg.logit_scale
    if cfg.final_softcap is not None:
        logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits, captured
