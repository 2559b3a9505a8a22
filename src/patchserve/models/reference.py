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
from patchserve.models.layers import (
    MLP,
    activation,
    check_rope_positions,
    rope_attention_factor,
    rope_inv_freq,
    rotate_half,
)
from patchserve.models.moe import MoE
from patchserve.models.transformer import Transformer

Edit = Callable[[int, str, torch.Tensor], torch.Tensor]


def _blocks(model: Transformer) -> list[DecoderBlock]:
    return [cast(DecoderBlock, block) for block in model.blocks]


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = x @ module.weight.T
    return out + module.bias if module.bias is not None else out


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, …)`` → ``(-x1, x0, -x3, x2, …)``: neighbours rotate together."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _rotate(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    interleaved: bool = False,
    float32: bool = False,
    factor: float = 1.0,
) -> torch.Tensor:
    """Rotary embedding of the first ``2 * len(inv_freq)`` channels of ``x`` [b, t, h, d]
    (``float32``: rotated in float32, then cast back, as OLMo; cos and sin times ``factor``,
    LongRoPE's attention factor)."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]  # [t, rd/2]
    if interleaved:  # GPT-J, Cohere: channel 2i turns with channel 2i + 1
        emb = angles.repeat_interleave(2, dim=-1)  # [t, rd]: a0, a0, a1, a1, …
    else:  # channel i turns with channel i + rd/2
        emb = torch.cat((angles, angles), dim=-1)  # [t, rd]: a0, a1, …, a0, a1, …
    dtype = torch.float32 if float32 else x.dtype
    cos, sin = emb.cos() * factor, emb.sin() * factor
    cos, sin = cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]
    rd = emb.shape[-1]
    rotate = _rotate_pairs if interleaved else rotate_half
    rotated = (x[..., :rd] * cos + rotate(x[..., :rd]) * sin).to(x.dtype)
    return torch.cat((rotated, x[..., rd:]), dim=-1)


def _attention(model: Transformer, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Per-head outputs ``[b, t, heads, head_dim]`` of the normalised residual ``x``."""
    cfg, attn = model.cfg, _blocks(model)[layer].attn
    b, t, _ = x.shape
    q, k, v = _linear(attn.q_proj, x), _linear(attn.k_proj, x), _linear(attn.v_proj, x)
    if cfg.clip_qkv is not None:  # OLMo: clamp each projection
        q, k, v = (p.clamp(-cfg.clip_qkv, cfg.clip_qkv) for p in (q, k, v))
    if cfg.qk_norm_full_width and attn.q_norm is not None and attn.k_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)  # OLMo-2: over all heads at once
    q = q.view(b, t, cfg.num_heads, cfg.head_dim)
    k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim)
    if not cfg.qk_norm_full_width and attn.q_norm is not None and attn.k_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)  # per head
    rope = cfg.rope[layer]
    if rope is not None:
        check_rope_positions(rope, t - 1)
        positions, inv_freq = torch.arange(t, device=x.device), rope_inv_freq(rope).to(x.device)
        f32, factor = rope.tables_float32, rope_attention_factor(rope)
        q = _rotate(q, positions, inv_freq, rope.interleaved, f32, factor)
        k = _rotate(k, positions, inv_freq, rope.interleaved, f32, factor)
    group = cfg.num_heads // cfg.num_kv_heads  # grouped-query attention: share each kv head
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn.scale
    if cfg.attn_softcap is not None:
        scores = torch.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    i = torch.arange(t, device=x.device)
    if cfg.alibi_slopes is not None:  # ALiBi: + slope_h × (key − query), per head
        slopes = torch.tensor(cfg.alibi_slopes, device=x.device).to(getattr(torch, cfg.alibi_dtype))
        at = (slopes[:, None] * i[None, :]).float()  # slope_h × position, [heads, t]
        bias = (at[:, None, :] - at[:, :, None]) * cfg.alibi_scale  # [heads, queries, keys]
        scores = scores + bias[None]
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
    if model.project_in is not None:  # OPT-350m: a narrower embedding, projected
        x = _linear(model.project_in, x)
    if cfg.embed_scale is not None:
        x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
    if model.embed_positions is not None:
        start = cfg.position_offset  # OPT: position p reads row p + 2
        x = x + model.embed_positions.weight[start : start + input_ids.shape[1]]
    branch_scale = cfg.residual_multiplier  # Granite: each branch's output × it
    if model.embed_norm is not None:
        x = model.embed_norm(x)
    for layer, block in enumerate(_blocks(model)):
        # attn_norm / mlp_norm are identities where a family has no pre-norms (OLMo-2)
        x = site(layer, "pre_attn", x)
        attn_in = x if cfg.post_ln_residual else block.attn_norm(x)
        z = site(layer, "attn_head", _attention(model, layer, attn_in))
        a = _linear(block.attn.o_proj, z.flatten(-2))
        a = block.attn_post_norm(a) if block.attn_post_norm else a
        a = site(layer, "attn_out", a * branch_scale if branch_scale is not None else a)
        if cfg.post_ln_residual:  # post-LN: the residual sums are normalised
            h = site(layer, "post_attn", block.attn_norm(x + a))
            m_in = site(layer, "mlp_in", h)
            m = _mlp(model, layer, m_in)
            m = site(layer, "mlp_out", block.mlp_post_norm(m) if block.mlp_post_norm else m)
            x = site(layer, "post_block", block.mlp_norm(h + m))
            continue
        h = site(layer, "post_attn", x + a)
        m_in = site(layer, "mlp_in", block.mlp_norm(x if cfg.parallel_residual else h))
        m = (_moe if layer in cfg.moe_layers else _mlp)(model, layer, m_in)
        m = block.mlp_post_norm(m) if block.mlp_post_norm else m
        m = site(layer, "mlp_out", m * branch_scale if branch_scale is not None else m)
        x = site(layer, "post_block", h + m)
    x = model.final_norm(x)  # an identity where the config has none
    if model.project_out is not None:
        x = _linear(model.project_out, x)
    logits = _linear(model.lm_head, x)
    if cfg.logit_scale is not None:
        logits = logits * cfg.logit_scale
    if cfg.final_softcap is not None:
        logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits, captured
