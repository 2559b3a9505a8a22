"""The decoder block, with every hook site in plain sight.

One class covers all supported families, on a padded ``[batch, tokens, d]``
or packed ``[tokens, d]`` residual stream (only attention needs to know
which). The family differences are which norms exist (Gemma's post-branch
norms) and whether the MLP reads the residual before or after attention
(GPT-NeoX's parallel residual). For a parallel block ``post_attn`` is a
virtual residual, ``pre_attn + attn_out``: writing it changes ``post_block``
exactly as writing ``attn_out`` would, and the MLP still reads ``pre_attn``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from patchserve.models.attention import Attention
from patchserve.models.config import ModelConfig
from patchserve.models.layers import MLP, make_norm

if TYPE_CHECKING:
    from patchserve.models.state import PassState, Reuse


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.parallel = cfg.parallel_residual
        d = cfg.hidden_size
        self.attn_norm = make_norm(cfg.norm_kind, d, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.attn_post_norm = (
            make_norm(cfg.norm_kind, d, cfg.norm_eps) if cfg.post_attn_norm else None
        )
        self.mlp_norm = make_norm(cfg.norm_kind, d, cfg.norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.activation, cfg.gated_mlp, cfg.mlp_bias)
        self.mlp_post_norm = (
            make_norm(cfg.norm_kind, d, cfg.norm_eps) if cfg.post_mlp_norm else None
        )

    def forward(
        self, x: torch.Tensor, state: PassState, reuse: Reuse | None = None
    ) -> torch.Tensor:
        site, i = state.hooks.site, self.layer
        x = site(i, "pre_attn", x)
        a = site(i, "attn_out", self.attention_branch(x, state, reuse))
        x = state.narrowed(i, x)  # the final block may keep only the rows' last tokens
        h = site(i, "post_attn", x + a)
        m_in = site(i, "mlp_in", self.mlp_norm(x if self.parallel else h))
        m = site(i, "mlp_out", self.mlp_branch(m_in))
        return site(i, "post_block", h + m)

    def attention_branch(
        self, x: torch.Tensor, state: PassState, reuse: Reuse | None = None
    ) -> torch.Tensor:
        """``attn_out`` of the residual ``x``: norm, attention, ``attn_head`` site, o_proj.

        ``reuse`` short-cuts a resumed block whose attention inputs are
        unchanged: its ``attn_out`` (returned as is) or its per-head ``attn_head``
        output (from which o_proj and any post-norm are recomputed).
        """
        if state.narrows(self.layer):
            # Sites from here on hold the rows' last tokens only.
            state.hooks.layout = state.layout.narrow()
        if reuse is not None and reuse.attn_out is not None:
            return state.narrowed(self.layer, reuse.attn_out)
        attn = self.attn
        if reuse is not None and reuse.attn_head is not None:
            z = state.narrowed(self.layer, reuse.attn_head)
        else:
            z = attn(self.attn_norm(x), state)
        z = state.hooks.site(self.layer, "attn_head", z)
        out = attn.o_proj(z.flatten(-2))
        return self.attn_post_norm(out) if self.attn_post_norm is not None else out

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return self.mlp_post_norm(out) if self.mlp_post_norm is not None else out
