"""The mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): top-k routed experts.

A router scores the experts for each token (softmax in float32), the token goes
to its ``experts_per_token`` best ones, and the block returns the routing-weighted
sum of their outputs — plus, for Qwen2-MoE, a shared expert gated by a sigmoid.
Routing is per token, so a token's output never depends on the other tokens of
the pass: each expert runs on the tokens routed to it alone and adds into their
rows in expert order. Which tokens share an expert's product depends on the
whole pass's content (not only its shape, as for a dense MLP), so the block
always runs its :class:`~patchserve.models.invariance.Linear` projections
batch-invariantly: a token's result is the same bits whatever other tokens are
in the pass — a clean and a corrupt prompt agree exactly on their common prefix.
(As for the dense MLP, this needs expert widths that are multiples of the CPU's
SIMD chunk, 64, as real checkpoints have: the activation's vectorised and
scalar-tail paths round differently.)
"""

from __future__ import annotations

import torch
from torch import nn

from patchserve.models.config import ModelConfig
from patchserve.models.invariance import Linear, batch_invariant
from patchserve.models.layers import MLP

ROW_WIDTH = 64  # a multiple of every CPU SIMD loop's chunk (2 vectors; bf16 AVX-512: 64)


class MoE(nn.Module):
    """``sum_k weight_k * expert_k(x)`` over each token's top-k experts (+ the shared expert)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, act = cfg.hidden_size, cfg.activation
        self.top_k = cfg.experts_per_token
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weights_model_dtype = cfg.moe_weights_model_dtype
        self.router = Linear(d, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(d, cfg.moe_intermediate_size, act, True, False) for _ in range(cfg.num_experts)
        )
        shared = cfg.shared_expert_size
        self.shared_expert = MLP(d, shared, act, True, False) if shared else None
        self.shared_expert_gate = Linear(d, 1, bias=False) if shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights and experts ``[tokens, top_k]`` of the tokens ``x`` ``[tokens, d]``."""
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_model_dtype:
            weights = weights.to(logits.dtype)
        return weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with batch_invariant():  # which tokens share an expert's product is content-dependent
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(flat)
        out = torch.zeros_like(flat)
        # (token, slot) pairs grouped by expert, in token order within each expert
        order = chosen.flatten().argsort(stable=True)
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        for expert, pairs in zip(self.experts, order.split(counts), strict=True):
            if pairs.numel() == 0:
                continue
            token, slot = pairs // self.top_k, pairs % self.top_k
            y = expert(flat.index_select(0, token)) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            gate = rowwise_sigmoid(self.shared_expert_gate(flat))
            out = out + gate * self.shared_expert(flat)
        return out.reshape(x.shape)


def rowwise_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``sigmoid`` of ``x`` ``[tokens, 1]``, each row's bits independent of the row count.

    CPU kernels run the vectorised sigmoid on whole SIMD chunks and a scalar one on the
    tail, which round differently; spread over :data:`ROW_WIDTH` columns every element
    takes the vectorised path, wherever its row sits.
    """
    return torch.sigmoid(x.expand(-1, ROW_WIDTH).contiguous())[:, :1]
