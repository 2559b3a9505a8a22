"""Building blocks shared by the model families: norms, rotary embedding, MLPs.

Each computes exactly what its ``transformers`` counterpart computes (same
dtype promotions), because ``transformers`` is our numerical oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from patchserve.models.config import ModelConfig, NormKind, RopeConfig
from patchserve.models.decode_kernels import DecodeLinear


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


class FloatRMSNorm(RMSNorm):
    """OLMo-2's RMSNorm: ``weight`` multiplies the float32 normalised input, then the cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


class PlainLayerNorm(nn.Module):
    """OLMo's LayerNorm: no weight, no bias, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,), None, None, eps=self.eps).to(x.dtype)


def rms_norm(kind: NormKind, dim: int, eps: float) -> RMSNorm:
    """The RMSNorm of a family's ``norm_kind`` (for q/k norms)."""
    if kind == "rms_float":
        return FloatRMSNorm(dim, eps)
    return RMSNorm(dim, eps, one_plus=kind == "rms_one_plus")


def layer_norm_f32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean-centred LayerNorm over the last dim without bias, all in float32 (Cohere)."""
    x32 = x.float()
    centred = x32 - x32.mean(-1, keepdim=True)
    normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * normed).to(x.dtype)


class BiasFreeLayerNorm(nn.Module):
    """Cohere's LayerNorm: weight only, computed in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_f32(x, self.weight, self.eps)


class HeadLayerNorm(nn.Module):
    """A bias-free float32 LayerNorm over ``head_dim`` of ``[..., heads, head_dim]`` with one
    weight per head, ``weight.{h}`` (Cohere's and StableLM's q/k norms)."""

    def __init__(self, heads: int, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_f32(x, torch.stack(tuple(self.weight)), self.eps)


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "layer_plain":
        return PlainLayerNorm(dim, eps)
    if kind == "rms_float":
        return FloatRMSNorm(dim, eps)
    if kind == "layer_no_bias":
        return BiasFreeLayerNorm(dim, eps)
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
        self.gate_proj = DecodeLinear(dim, hidden, bias=bias) if gated else None
        self.up_proj = DecodeLinear(dim, hidden, bias=bias)
        self.down_proj = DecodeLinear(hidden, dim, bias=bias)

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
    if kind == "longrope":
        # The short factors: those transformers uses for positions within
        # original_max_position_embeddings (see rope_position_limit).
        ext = torch.tensor(scaling["short_factor"], dtype=torch.float32)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (ext * rope.theta**shape)
    raise ValueError(f"unsupported rope_type {kind!r}")


def rope_attention_factor(rope: RopeConfig) -> float:
    """The factor cos and sin are multiplied by (LongRoPE's attention factor; else 1)."""
    scaling = rope.scaling_params()
    return float(scaling.get("attention_factor", 1.0)) if scaling is not None else 1.0


def rope_position_limit(rope: RopeConfig) -> int | None:
    """The first position the rotary tables cannot serve exactly, or None.

    LongRoPE: ``transformers`` uses the short factors while a pass's last position is
    below ``original_max_position_embeddings`` and recomputes every position with the
    long factors past it, which a cached pass cannot follow; such positions are refused.
    """
    scaling = rope.scaling_params()
    if scaling is None or scaling["rope_type"] != "longrope":
        return None
    return int(scaling["original_max_position_embeddings"])


def position_limit(cfg: ModelConfig) -> int | None:
    """How many positions the runtime computes exactly, or None (no limit): a learned
    absolute position table's rows, LongRoPE's ``original_max_position_embeddings``.
    Rotary models without it compute any position as ``transformers`` does."""
    limits = [rope_position_limit(r) for r in cfg.rope if r is not None]
    if cfg.learned_positions:
        limits.append(cfg.max_position_embeddings)
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def check_rope_positions(rope: RopeConfig, last_position: int) -> None:
    """A ``ValueError`` naming the limit when ``last_position`` is past what ``rope`` serves."""
    limit = rope_position_limit(rope)
    if limit is not None and last_position >= limit:
        raise ValueError(
            f"position {last_position} is past this model's LongRoPE "
            f"original_max_position_embeddings ({limit}): transformers switches every position "
            f"to the long factors there, which a cached pass cannot reproduce; "
            f"at most {limit} tokens are supported"
        )


class Rotary(nn.Module):
    """cos/sin tables for absolute positions; ``rotate_half`` or interleaved convention,
    optionally partial."""

    def __init__(self, rope: RopeConfig) -> None:
        super().__init__()
        self.rope = rope
        self.rotary_dim = rope.rotary_dim
        self.register_buffer("inv_freq", rope_inv_freq(rope), persistent=False)
        self.attention_factor = rope_attention_factor(rope)

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
        emb = interleave_or_cat(freqs, self.rope.interleaved)
        dtype = torch.float32 if self.rope.tables_float32 else dtype
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:  # in float32 before the cast, as transformers
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        cos, sin = cos.to(dtype)[..., None, :], sin.to(dtype)[..., None, :]
        return cos.to(positions.device), sin.to(positions.device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """Interleaved convention (GPT-J, Cohere): pairs ``(x0, x1), (x2, x3)…`` → ``(-x1, x0)…``."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def interleave_or_cat(freqs: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Angles ``[..., rd/2]`` → ``[..., rd]``: each repeated in place (interleaved
    pairs) or the whole list twice (``rotate_half``'s halves)."""
    if interleaved:
        return freqs.repeat_interleave(2, dim=-1)
    return torch.cat((freqs, freqs), dim=-1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x`` [*tokens, heads, head_dim]
    (``interleaved``: pairs of neighbouring channels, the tables built to match)."""
    rotate = rotate_every_two if interleaved else rotate_half
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return (x * cos + rotate(x) * sin).to(x.dtype)  # float32 tables: cast back
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat(((x_rot * cos + rotate(x_rot) * sin).to(x.dtype), x_pass), dim=-1)
