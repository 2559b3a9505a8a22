"""The decoder block, with every hook site in plain sight.

One class covers all supported families, on a padded ``[batch, tokens, d]``
or packed ``[tokens, d]`` residual stream (only attention needs to know
which). The family differences it sees are data: which norms exist (pre-norms,
Gemma's and OLMo-2's post-branch norms), a branch scale (Granite), a routed MLP
(mixture of experts), and whether the MLP reads the residual before or after
attention (parallel residual: GPT-NeoX, GPT-J, Phi, Cohere, Falcon). For a
parallel block ``post_attn`` is a virtual residual, ``pre_attn + attn_out``:
writing it changes ``post_block`` exactly as writing ``attn_out`` would, and the
MLP still reads ``pre_attn``.

A post-LN block (OPT-350m, ``post_ln_residual``) normalises the residual sums
instead of the branch inputs: attention reads ``pre_attn`` itself, ``post_attn``
is ``attn_norm(pre_attn + attn_out)``, the MLP reads ``post_attn`` (``mlp_in``
is ``post_attn``) and ``post_block`` is ``mlp_norm(post_attn + mlp_out)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from patchserve.models.attention import Attention
from patchserve.models.config import ModelConfig
from patchserve.models.layers import MLP, make_norm
from patchserve.models.moe import MoE

if TYPE_CHECKING:
    from patchserve.models.state import PassState, Reuse

Site = Callable[[int, str, torch.Tensor], torch.Tensor]


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.parallel = cfg.parallel_residual
        self.post_ln = cfg.post_ln_residual
        d = cfg.hidden_size
        self.attn_norm = make_norm(cfg.norm_kind, d, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.attn_post_norm = (
            make_norm(cfg.norm_kind, d, cfg.norm_eps) if cfg.post_attn_norm else None
        )
        self.mlp_norm = make_norm(cfg.norm_kind, d, cfg.norm_eps)
        self.mlp: MLP | MoE = (
            MoE(cfg)
            if layer in cfg.moe_layers
            else MLP(d, cfg.intermediate_size, cfg.activation, cfg.gated_mlp, cfg.mlp_bias)
        )
        self.mlp_post_norm = (
            make_norm(cfg.norm_kind, d, cfg.norm_eps) if cfg.post_mlp_norm else None
        )
        if not cfg.pre_norms:  # OLMo-2: the branches read the residual itself
            self.attn_norm, self.mlp_norm = nn.Identity(), nn.Identity()
        self.branch_scale = cfg.residual_multiplier  # Granite: each branch's output × it

    def forward(
        self, x: torch.Tensor, state: PassState, reuse: Reuse | None = None
    ) -> torch.Tensor:
        site, i = state.site, self.layer
        x = site(i, "pre_attn", x)
        a = site(i, "attn_out", self.attention_branch(x, state, reuse))
        return self._residual_tail(x, a, site)

    def forward_last(
        self, x: torch.Tensor, state: PassState, reuse: Reuse | None = None
    ) -> torch.Tensor:
        """The block for each row's last token only: ``post_block`` ``[rows, d]``.

        Keys and values still cover every token of ``x``; queries, the output
        projection and the MLP run for the last tokens alone, whose sites (after
        ``pre_attn``) hold ``[rows, ...]``. The same values as :meth:`forward`
        at those tokens, up to float rounding.
        """
        i = self.layer
        x = state.site(i, "pre_attn", x)
        site = state.last_site
        if reuse is not None and reuse.attn_out is not None:
            a = state.last_tokens(reuse.attn_out)
        else:
            if reuse is not None and reuse.attn_head is not None:
                z = state.last_tokens(reuse.attn_head)
            else:
                z = self.attn.forward_last(self._attn_input(x), state)
            a = self._project(site(i, "attn_head", z))
        return self._residual_tail(state.last_tokens(x), site(i, "attn_out", a), site)

    def _residual_tail(self, x: torch.Tensor, a: torch.Tensor, site: Site) -> torch.Tensor:
        """``post_block`` from the block input ``x`` and its attention output ``a``."""
        if self.post_ln:
            return self._post_ln_tail(x, a, site)
        i = self.layer
        h = site(i, "post_attn", x + a)
        m_in = site(i, "mlp_in", self.mlp_norm(x if self.parallel else h))
        m = site(i, "mlp_out", self.mlp_branch(m_in))
        return site(i, "post_block", h + m)

    def _post_ln_tail(self, x: torch.Tensor, a: torch.Tensor, site: Site) -> torch.Tensor:
        """:meth:`_residual_tail` of a post-LN block: each residual sum is normalised."""
        i = self.layer
        h = site(i, "post_attn", self.attn_norm(x + a))
        m_in = site(i, "mlp_in", h)
        m = site(i, "mlp_out", self.mlp_branch(m_in))
        return site(i, "post_block", self.mlp_norm(h + m))

    def _attn_input(self, x: torch.Tensor) -> torch.Tensor:
        """What attention reads of the residual ``x``: its norm (post-LN: ``x`` itself)."""
        return x if self.post_ln else self.attn_norm(x)

    def attention_branch(
        self, x: torch.Tensor, state: PassState, reuse: Reuse | None = None
    ) -> torch.Tensor:
        """``attn_out`` of the residual ``x``: norm, attention, ``attn_head`` site, o_proj.

        ``reuse`` short-cuts a resumed block whose attention inputs are
        unchanged: its ``attn_out`` (returned as is) or its per-head ``attn_head``
        output (from which o_proj and any post-norm are recomputed).
        """
        if reuse is not None and reuse.attn_out is not None:
            return reuse.attn_out
        if reuse is not None and reuse.attn_head is not None:
            z = reuse.attn_head
        else:
            z = self.attn(self._attn_input(x), state)
        return self._project(state.site(self.layer, "attn_head", z))

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        """The output projection (and any post-norm) of per-head outputs ``z``."""
        out = self.attn.o_proj(z.flatten(-2))
        out = self.attn_post_norm(out) if self.attn_post_norm is not None else out
        return self._scale_branch(out)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        out = self.mlp_post_norm(out) if self.mlp_post_norm is not None else out
        return self._scale_branch(out)

    def _scale_branch(self, out: torch.Tensor) -> torch.Tensor:
        """A branch output times the residual multiplier, if any: what is added to the residual."""
        return out * self.branch_scale if self.branch_scale is not None else out
