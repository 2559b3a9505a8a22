"""Building blocks shared by the model families: norms, rotary embedding, MLPs.

Each computes exactly what its ``transformers`` counterpart computes (same
dtype promotions), because ``transformers`` is our numerical oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from patchserve.models.config import NormKind, RopeConfig
from patchserve.models.invariance import Linear


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalise in float32, scale by ``weight`` in the input dtype.

    ``one_plus=True`` is Gemma's variant: the scale is ``1 + weight`` and the
    product is taken in float32 before the cast back.
    """

    def __init__(self, dim: int, eps: float, one_plus: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.one_plus = one_plus
        self.weight = nn.Parameter(torch.zeros(dim) if one_plus else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.one_plus:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "layer_no_affine":  # OPT layer_norm_elementwise_affine=False
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    return RMSNorm(dim, eps, one_plus=kind == "rms_one_plus")


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}"
        ) from None


class MLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` when gated, else ``down(act(up(x)))``."""

    def __init__(self, dim: int, hidden: int, act: str, gated: bool, bias: bool) -> None:
        super().__init__()
        self.gated = gated
        self.act = activation(act)
        self.gate_proj = Linear(dim, hidden, bias=bias) if gated else None
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


def rope_inv_freq(rope: RopeConfig) -> torch.Tensor:
    dim = rope.rotary_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = rope.scaling_params()
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}")


class Rotary(nn.Module):
    """cos/sin tables for absolute positions; ``rotate_half`` convention, optionally partial."""

    def __init__(self, rope: RopeConfig) -> None:
        super().__init__()
        self.rope = rope
        self.rotary_dim = rope.rotary_dim
        self.register_buffer("inv_freq", rope_inv_freq(rope), persistent=False)

    def reset(self, device: torch.device | str) -> None:
        """Recompute the frequencies in float32 (after a meta-device build or a dtype cast)."""
        self.inv_freq = rope_inv_freq(self.rope).to(device)

    def tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [*tokens] → cos, sin [*tokens, 1, rotary_dim] (broadcast over heads)."""
        # On the frequencies' device (a device map's first), whichever device asks: every
        # pass sees the same bits, and copies them over.
        freqs = positions.to(self.inv_freq.device).float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype)[..., None, :], emb.sin().to(dtype)[..., None, :]
        return cos.to(positions.device), sin.to(positions.device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x`` [*tokens, heads, head_dim]."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
