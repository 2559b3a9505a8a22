"""Causal self-attention with a reusable key/value prefix.

Queries of the tokens being computed attend to two key sets: a *prefix*
(keys/values already in a cache, absolute positions ``0..P-1``) and the
*new* keys computed in this pass. A prefix with batch 1 is shared by every
row without being copied: its scores are one batched matmul with the rows
folded into the matrix dimension. That is what lets a sweep recompute
thousands of patched suffixes on top of one corrupt-run cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from patchserve.models.config import CheckpointError, ModelConfig
from patchserve.models.decode_kernels import DecodeLinear
from patchserve.models.invariance import fixed_row_batches
from patchserve.models.layers import HeadLayerNorm, RMSNorm, apply_rotary, make_norm, rms_norm

if TYPE_CHECKING:
    from patchserve.models.layout import AttentionGroup
    from patchserve.models.state import PassState


@dataclass
class AttentionMasks:
    """Boolean masks (True = may attend) for one window size.

    ``new``: [batch, 1, tokens, tokens]; ``prefix``: [batch, 1, tokens, P] or
    None when there is no prefix. ``causal_only`` marks the common case that
    SDPA's own ``is_causal`` handles (no padding, no window, no prefix).
    """

    new: torch.Tensor | None
    prefix: torch.Tensor | None
    causal_only: bool


class AlibiBias:
    """ALiBi's additive attention bias (Bloom, Falcon), float32 ``[..., H, queries, keys]``
    for queries and keys at absolute positions: ``slope_h × (key − query)`` times
    ``cfg.alibi_scale``, each ``slope_h × position`` product taken in ``cfg.alibi_dtype`` as
    the checkpoint's own code takes it (Falcon: bfloat16).

    ``transformers`` adds ``slope_h × key`` alone: that differs by a constant per query,
    which softmax ignores; the difference keeps the bias small near the query (where the
    weight is), so a half-precision SDPA mask holds it well.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        assert cfg.alibi_slopes is not None
        self.values = cfg.alibi_slopes
        self.dtype: torch.dtype = getattr(torch, cfg.alibi_dtype)
        self.scale = cfg.alibi_scale
        self._slopes: dict[torch.device, torch.Tensor] = {}

    def __call__(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """The bias of ``keys`` ``[..., tk]`` seen from ``queries`` ``[..., tq]`` (positions)."""
        device = keys.device
        if device not in self._slopes:
            slopes = torch.tensor(self.values, dtype=torch.float32).to(self.dtype)
            self._slopes[device] = slopes[:, None].to(device)  # [H, 1]
        slopes = self._slopes[device]
        at_keys = (slopes * keys[..., None, :]).float()  # [..., H, tk]
        at_queries = (slopes * queries[..., None, :]).float()  # [..., H, tq]
        return (at_keys[..., None, :] - at_queries[..., :, None]) * self.scale


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_proj = DecodeLinear(cfg.hidden_size, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = DecodeLinear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = DecodeLinear(cfg.hidden_size, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = DecodeLinear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = qk_norm(cfg, cfg.num_heads)
        self.k_norm = qk_norm(cfg, cfg.num_kv_heads)
        self.qk_norm_full = cfg.qk_norm_full_width
        if cfg.qk_norm_full_width:  # OLMo-2: one norm over every head's channels
            self.q_norm = rms_norm(cfg.norm_kind, cfg.q_size, cfg.norm_eps)
            self.k_norm = rms_norm(cfg.norm_kind, cfg.kv_size, cfg.norm_eps)
        self.clip = cfg.clip_qkv
        self.scale = cfg.attn_scale / (layer + 1 if cfg.attn_scale_by_layer else 1)
        self.softcap = cfg.attn_softcap
        self.window = cfg.sliding_windows[layer]
        self.rope = cfg.rope[layer]
        self.interleaved = self.rope is not None and self.rope.interleaved
        self.alibi = AlibiBias(cfg) if cfg.alibi_slopes is not None else None

    def forward(self, x: torch.Tensor, state: PassState) -> torch.Tensor:
        """Per-head attention outputs ``[*tokens, H, D]`` of the normalised residual ``x``.

        Queries attend the pass's prefix cache and the new keys, one attention
        group at a time (see :class:`~patchserve.models.layout.Layout`).
        """
        cos_sin = state.rope_tables(self.rope)
        k, v = self.keys_values(x, cos_sin)
        q = self.queries(x, cos_sin)
        if state.block is not None:
            return self._attend_block(state, q, k, v)
        if state.layout.absolute:
            return self._attend_absolute(state, q, k, v, last=False)
        groups = state.layout.groups
        if len(groups) == 1:  # padded rows (or one packed group): no scatter back
            g = groups[0]
            kg, vg = g.pad(k).transpose(1, 2), g.pad(v).transpose(1, 2)
            state.keep_kv(self.layer, kg, vg)
            return g.unpad(self._attend_group(state, 0, g.pad(q), kg, vg, last=False))
        z = torch.empty_like(q)
        for i, g in enumerate(groups):
            kg, vg = g.pad(k).transpose(1, 2), g.pad(v).transpose(1, 2)
            z[g.tokens] = g.unpad(self._attend_group(state, i, g.pad(q), kg, vg, last=False))
        return z

    def forward_last(self, x: torch.Tensor, state: PassState) -> torch.Tensor:
        """Attention outputs ``[rows, H, D]`` of each row's last token only.

        Keys and values still cover every token of ``x``; only the queries (and
        so the output) are narrowed, for a final block whose other tokens are
        never read.
        """
        k, v = self.keys_values(x, state.rope_tables(self.rope))
        q = self.queries(state.last_tokens(x), state.rope_tables(self.rope, last=True))
        if state.layout.absolute:
            return self._attend_absolute(state, q, k, v, last=True)
        z = torch.empty_like(q)
        for i, g in enumerate(state.layout.groups):
            kg, vg = g.pad(k).transpose(1, 2), g.pad(v).transpose(1, 2)
            z[g.rows] = self._attend_group(state, i, q[g.rows, None], kg, vg, last=True)[:, 0]
        return z

    def _attend_group(
        self,
        state: PassState,
        index: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        last: bool,
    ) -> torch.Tensor:
        """Attention of one group's padded queries ``[rows, Tq, H, D]`` → ``[rows, Tq, H, D]``."""
        prefix = state.prefix_kv(self.layer, state.layout.groups[index].prefix_limit)
        masks = state.masks(index, self.window, last)
        bias = self._group_bias(state.layout.groups[index], prefix, last)
        return attend(q.transpose(1, 2), k, v, prefix, masks, self.scale, self.softcap, bias)

    def _group_bias(
        self, group: AttentionGroup, prefix: tuple[torch.Tensor, torch.Tensor] | None, last: bool
    ) -> torch.Tensor | None:
        """ALiBi's bias ``[rows, H, tq, P + tmax]`` of a group: keys of the prefix (absolute
        positions ``0..P-1``), then the group's own padded slots; queries at those slots (or
        ``last``: each row's last token). None without ALiBi."""
        if self.alibi is None:
            return None
        grid = group.grid
        p = prefix[0].shape[2] if prefix is not None else 0
        cached = torch.arange(p, device=grid.device).expand(grid.shape[0], p)
        queries = (group.offsets + group.lengths - 1)[:, None] if last else grid
        return self.alibi(torch.cat((cached, grid), dim=1), queries)

    def _attend_block(
        self, state: PassState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Padded rows on a :class:`~patchserve.models.state.KVBlock`: their keys and values
        written in place at their positions, then attention over the block's slots."""
        assert state.block is not None
        grid = state.layout.positions  # [rows, t]
        kb, vb = state.block.write(self.layer, grid, k, v)
        masks = state.block_masks(self.window)
        bias = None
        if self.alibi is not None:
            slots = torch.arange(state.block.end, device=q.device)
            bias = self.alibi(slots.expand(grid.shape[0], -1), grid)
        elif grid.shape[1] == 1 and self.softcap is None and self.num_heads != self.num_kv_heads:
            return self._attend_step_grouped(q, kb, vb, masks)
        return attend(q.transpose(1, 2), kb, vb, None, masks, self.scale, self.softcap, bias)

    def _attend_step_grouped(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: AttentionMasks
    ) -> torch.Tensor:
        """A decoding step's one query per row ``[rows, 1, H, D]`` on the block, the query heads
        of each key/value head folded into that head's query axis (``[rows, KV, H/KV, D]``:
        every key read once per key/value head, not once per query head, as ``transformers``
        decodes); the row's mask ``[rows, 1, 1, slots]`` is the same for every head."""
        rows, kv = q.shape[0], self.num_kv_heads
        folded = q.reshape(rows, kv, self.num_heads // kv, self.head_dim)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=masks.new, scale=self.scale)
        return out.reshape(rows, 1, self.num_heads, self.head_dim)

    def _attend_absolute(
        self, state: PassState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: bool
    ) -> torch.Tensor:
        """Attention of packed rows in absolute geometry (a batch-invariant pass, see
        :mod:`~patchserve.models.invariance`): each row's keys fill every slot up to the
        rows' common end (cached prefix, then its own), its queries sit at their absolute
        slots (``last``: one query, each row's last token) — the same shapes for every row,
        so its result does not depend on the rows beside it."""
        masks = state.absolute_masks(self.window, last)
        end = state.layout.end
        slots = torch.arange(end, device=q.device)
        bias = None  # ALiBi: [1, H, tq, end], the same for every row
        if self.alibi is not None:
            bias = self.alibi(slots[None], slots[None, -1:] if last else slots[None])
        z = torch.empty_like(q)
        # One query per row: written out (the CPU's fp32 SDPA with 2+ threads gives a row
        # other bits by its slot in the batch); in fixed batches of rows (kernels split their
        # work by the batch size).
        attn = _attend_explicit if last else attend
        for g in state.layout.groups:
            kg, vg = state.absolute_kv(self.layer, g, k, v)
            qg = q[g.rows, None] if last else g.place(q, end)
            out = fixed_row_batches(
                lambda q_, k_, v_: attn(q_, k_, v_, None, masks, self.scale, self.softcap, bias),
                qg.transpose(1, 2),
                kg,
                vg,
            )
            if last:
                z[g.rows] = out[:, 0]
            else:
                z[g.tokens] = g.take(out)
        return z

    def queries(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """Rotated queries ``[*tokens, H, D]`` of ``x``."""
        q = self._whole(self.q_proj(x), self.q_norm)
        q = q.view(*x.shape[:-1], self.num_heads, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            q = self.q_norm(q)
        return apply_rotary(q, *cos_sin, self.interleaved) if cos_sin is not None else q

    def keys_values(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values ``[*tokens, KV, D]`` of ``x``."""
        lead = x.shape[:-1]
        k = self._whole(self.k_proj(x), self.k_norm).view(*lead, self.num_kv_heads, self.head_dim)
        v = self._whole(self.v_proj(x), None).view(*lead, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None and not self.qk_norm_full:
            k = self.k_norm(k)
        return (apply_rotary(k, *cos_sin, self.interleaved) if cos_sin is not None else k), v

    def _whole(self, t: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """A projection ``t`` before its split into heads: OLMo's clipping, then a full-width
        q/k norm (``norm``, applied only where the config says so)."""
        if self.clip is not None:
            t = t.clamp(-self.clip, self.clip)
        return norm(t) if norm is not None and self.qk_norm_full else t


def qk_norm(cfg: ModelConfig, heads: int) -> nn.Module | None:
    """The norm of ``heads`` query or key heads before rotary, if the family has one: the
    per-head RMS norm, or a LayerNorm over ``head_dim`` shared by every head or one per head."""
    if not cfg.qk_norm:
        return None
    if cfg.qk_norm_kind is None:
        return RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_kind == "rms_one_plus")
    if cfg.qk_norm_per_head:
        if cfg.qk_norm_kind != "layer_no_bias":
            raise CheckpointError(f"per-head q/k norms of kind {cfg.qk_norm_kind!r}: unsupported")
        return HeadLayerNorm(heads, cfg.head_dim, cfg.norm_eps)
    return make_norm(cfg.qk_norm_kind, cfg.head_dim, cfg.norm_eps)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
    masks: AttentionMasks,
    scale: float,
    softcap: float | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output [B, Tq, H, D] of queries ``q`` [B, H, Tq, D] over ``prefix`` + new keys.

    ``bias``: an additive float32 bias ``[B or 1, H, Tq or 1, keys]`` over prefix + new keys
    (ALiBi).
    """
    b, h = q.shape[:2]
    kv = k.shape[1]
    if prefix is not None and prefix[0].shape[2] == 0:
        prefix = None
    if bias is not None and softcap is None and (prefix is None or prefix[0].shape[0] == b):
        return _attend_biased(q, k, v, prefix, masks, scale, bias)
    if bias is not None:
        return _attend_explicit(q, k, v, prefix, masks, scale, softcap, bias)
    if softcap is None and (prefix is None or prefix[0].shape[0] == b):
        if prefix is not None:
            k = torch.cat((prefix[0].expand(b, -1, -1, -1), k), dim=2)
            v = torch.cat((prefix[1].expand(b, -1, -1, -1), v), dim=2)
            mask = torch.cat((masks.prefix, masks.new), dim=-1)  # type: ignore[arg-type]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=kv != h
            )
        elif masks.causal_only:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=kv != h
            )
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=masks.new, scale=scale, enable_gqa=kv != h
            )
        return out.transpose(1, 2)
    return _attend_explicit(q, k, v, prefix, masks, scale, softcap)


def _attend_biased(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
    masks: AttentionMasks,
    scale: float,
    bias: torch.Tensor,
) -> torch.Tensor:
    """SDPA with an additive bias: a float mask, ``bias`` where a query may attend and
    ``-inf`` elsewhere, in the queries' dtype."""
    b, h, tq = q.shape[:3]
    mask = masks.new
    if prefix is not None:
        k = torch.cat((prefix[0].expand(b, -1, -1, -1), k), dim=2)
        v = torch.cat((prefix[1].expand(b, -1, -1, -1), v), dim=2)
        mask = torch.cat((masks.prefix, masks.new), dim=-1)  # type: ignore[arg-type]
    tk = k.shape[2]
    if mask is None:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    additive = torch.where(mask, bias, float("-inf")).to(q.dtype)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=additive, scale=scale, enable_gqa=k.shape[1] != h
    )
    return out.transpose(1, 2)


def _attend_explicit(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
    masks: AttentionMasks,
    scale: float,
    softcap: float | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention written out: soft-capping, an additive bias (ALiBi), and a shared
    (batch-1) prefix."""
    # Contiguous operands: a strided batched matmul picks its kernel by the batch size on some
    # CPUs (AMD EPYC, MKL), so a row's scores would depend on the rows beside it.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, tq, d = q.shape
    kv, tk = k.shape[1], k.shape[2]
    g = h // kv
    qg = q.reshape(b, kv, g * tq, d)  # query heads grouped under their kv head
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, kv, g, tq, tk)
    p = 0
    if prefix is not None:
        pk, pv = prefix
        p = pk.shape[2]
        if pk.shape[0] == 1:
            # Fold the rows into the matrix dimension: one matmul per kv head, no copy of K.
            qf = qg.transpose(0, 1).reshape(kv, b * g * tq, d)
            ps = torch.matmul(qf, pk[0].transpose(-1, -2)).view(kv, b, g, tq, p).transpose(0, 1)
        else:
            ps = torch.matmul(qg, pk.transpose(-1, -2)).view(b, kv, g, tq, p)
        scores = torch.cat((ps, scores), dim=-1)
    scores = scores * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:  # float32: the softmax below runs in float32 anyway
        scores = scores + bias.view(bias.shape[0], kv, g, bias.shape[2], bias.shape[3])
    mask = masks.new
    if prefix is not None and masks.prefix is not None and masks.new is not None:
        mask = torch.cat((masks.prefix, masks.new), dim=-1)
    if mask is None:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    scores = scores.masked_fill(~mask[:, :, None] if mask.dim() == 4 else ~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs[..., p:].reshape(b, kv, g * tq, tk), v)
    if prefix is not None:
        pp = probs[..., :p]
        pv = prefix[1]
        if pv.shape[0] == 1:
            pf = pp.transpose(0, 1).reshape(kv, b * g * tq, p)
            out = out + torch.matmul(pf, pv[0]).view(kv, b, g * tq, d).transpose(0, 1)
        else:
            out = out + torch.matmul(pp.reshape(b, kv, g * tq, p), pv)
    return out.view(b, kv, g, tq, d).reshape(b, h, tq, d).transpose(1, 2)
