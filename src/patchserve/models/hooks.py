"""Hook sites of a decoder block and the interventions applied at them.

Every block exposes the same named activations (docs/api.md §1). In TransformerLens
vocabulary: ``pre_attn`` = ``resid_pre``, ``attn_out`` = ``attn_out``,
``post_attn`` = ``resid_mid``, ``mlp_in`` = ``ln2.hook_normalized``,
``mlp_out`` = ``mlp_out``, ``post_block`` = ``resid_post`` and ``attn_head`` =
``z`` (one query head's attention output before the output projection).

A :class:`HookContext` is handed down one forward pass. At each site the block
calls ``ctx.site(layer, hook, tensor, layout)``, which applies the interventions
registered for that site (patches first, then additions) and records the
result when the site is captured. Interventions address batch rows and
*absolute* token positions, so the same request works for a full forward, a
suffix forward on a prefix cache, or one decoding step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from patchserve.wire.hooks import HOOKS, INJECTABLE_HOOKS, RESIDUAL_HOOKS

__all__ = ["HOOKS", "INJECTABLE_HOOKS", "RESIDUAL_HOOKS", "HookContext", "SiteEdit", "make_edit"]


def hook_unavailable(hook: str, runtime: str, offered: Iterable[str]) -> str:
    """Why ``hook`` is refused on a model whose runtime provides only ``offered``."""
    return (
        f"hook {hook!r} is not available on this model: it is served by the {runtime} runtime, "
        f"which provides exactly only these hooks: {', '.join(offered)}"
    )


def check_hook(hook: str) -> str:
    if hook not in HOOKS:
        raise ValueError(f"unknown hook {hook!r}; expected one of {', '.join(HOOKS)}")
    return hook


@dataclass
class SiteEdit:
    """A batch of edits at one ``(layer, hook)`` site.

    Entry ``i`` edits row ``rows[i]`` at absolute position ``positions[i]``
    (and query head ``heads[i]`` for ``attn_head``).

    ``kind == "patch"``: ``out = (1 - w) * h + w * source`` with
    ``w = alpha * mask`` — ``w == 1`` is an exact copy of the source and
    ``w == 0`` leaves ``h`` untouched, bit for bit.
    ``kind == "add"``: ``out = h + scale * source`` (steering); ``alpha``
    holds the scale.
    """

    layer: int
    hook: str
    rows: torch.Tensor  # long [n]
    positions: torch.Tensor  # long [n], absolute token positions
    source: torch.Tensor  # [n, width]
    alpha: torch.Tensor  # [n]
    mask: torch.Tensor | None = None  # [n, width] in [0, 1]
    heads: torch.Tensor | None = None  # long [n]
    kind: str = "patch"

    def __post_init__(self) -> None:
        check_hook(self.hook)
        if self.kind not in ("patch", "add"):
            raise ValueError(f"unknown edit kind {self.kind!r}")
        if (self.hook == "attn_head") != (self.heads is not None):
            raise ValueError("heads are given exactly for attn_head edits")
        n = self.rows.shape[0]
        if self.positions.shape != (n,) or self.alpha.shape != (n,) or self.source.shape[0] != n:
            raise ValueError("rows, positions, alpha and source must have one entry per edit")
        if self.mask is not None and self.mask.shape != self.source.shape:
            raise ValueError("mask must have the shape of source")

    def to(self, device: torch.device) -> SiteEdit:
        """This edit with every tensor on ``device`` (the site's layer's device)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            rows=self.rows.to(device),
            positions=self.positions.to(device),
            source=self.source.to(device),
            alpha=self.alpha.to(device),
            mask=move(self.mask),
            heads=move(self.heads),
        )


def make_edit(
    layer: int,
    hook: str,
    rows: Iterable[int] | torch.Tensor,
    positions: Iterable[int] | torch.Tensor,
    source: torch.Tensor,
    *,
    alpha: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    heads: Iterable[int] | torch.Tensor | None = None,
    kind: str = "patch",
) -> SiteEdit:
    """Build a :class:`SiteEdit` from plain Python values (on ``source``'s device)."""
    device = source.device
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=device).reshape(-1)
    pos_t = torch.as_tensor(positions, dtype=torch.long, device=device).reshape(-1)
    n = rows_t.shape[0]
    if source.dim() == 1:
        source = source.expand(n, -1)
    alpha_t = torch.as_tensor(alpha, dtype=torch.float32, device=device).reshape(-1)
    if alpha_t.shape[0] == 1 and n != 1:
        alpha_t = alpha_t.expand(n)
    if mask is not None and mask.dim() == 1:
        mask = mask.expand(n, -1)
    heads_t = None
    if heads is not None:
        heads_t = torch.as_tensor(heads, dtype=torch.long, device=device).reshape(-1)
        if heads_t.shape[0] == 1 and n != 1:
            heads_t = heads_t.expand(n)
    return SiteEdit(layer, hook, rows_t, pos_t, source, alpha_t, mask, heads_t, kind)


def blend(h: torch.Tensor, source: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(1 - w) * h + w * s`` with exact copies at ``w == 1`` and no-ops at ``w == 0``.

    The arithmetic runs in float32 (or the wider input dtype) and is cast back.
    """
    work = torch.promote_types(h.dtype, torch.float32)
    w = weight.to(work)
    mixed = ((1 - w) * h.to(work) + w * source.to(work)).to(h.dtype)
    src = source.to(h.dtype)
    return torch.where(w == 1, src, torch.where(w == 0, h, mixed))


class SiteLayout(Protocol):
    """How (row, absolute position) maps onto the tensors of one forward pass."""

    def locate(
        self, rows: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``keep`` [n] (entries this pass computes) and the index of the kept entries."""
        ...


@dataclass
class HookContext:
    """Interventions and captures for one forward pass.

    Each site call names the layout of its tensor (the context itself is never
    changed by a pass, apart from ``captured``); captured tensors are the site
    values after any edit, in that layout (``[batch, tokens, width]`` for a
    padded batch, ``[tokens, width]`` for packed rows; ``attn_head`` has
    ``heads, head_dim`` in place of ``width``).
    """

    edits: dict[tuple[int, str], list[SiteEdit]] = field(default_factory=dict)
    capture: set[tuple[int, str]] = field(default_factory=set)
    captured: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        edits: Iterable[SiteEdit] = (),
        capture: Iterable[tuple[int, str]] = (),
    ) -> HookContext:
        ctx = cls(capture={(int(layer), check_hook(hook)) for layer, hook in capture})
        for edit in edits:
            ctx.edits.setdefault((edit.layer, edit.hook), []).append(edit)
        return ctx

    def site(self, layer: int, hook: str, h: torch.Tensor, layout: SiteLayout) -> torch.Tensor:
        """``h`` after the site's edits (``layout`` locates their rows and positions)."""
        key = (layer, hook)
        edits = self.edits.get(key)
        if edits:
            # Patches first (they define the value), then additive steering.
            for edit in sorted(edits, key=lambda e: e.kind != "patch"):
                h = self._apply(h, edit, layout)
        if key in self.capture:
            self.captured[key] = h
        return h

    def captures_layer(self, layer: int) -> bool:
        return any(site_layer == layer for site_layer, _ in self.capture)

    def _apply(self, h: torch.Tensor, edit: SiteEdit, layout: SiteLayout) -> torch.Tensor:
        if edit.rows.device != h.device or edit.source.device != h.device:
            edit = edit.to(h.device)  # a device map: the layer is not where the edit was built
        keep, index = layout.locate(edit.rows, edit.positions)
        if not bool(keep.any()):
            return h
        source, alpha, mask, heads = edit.source, edit.alpha, edit.mask, edit.heads
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            source, alpha = source[idx], alpha[idx]
            mask = mask[idx] if mask is not None else None
            heads = heads[idx] if heads is not None else None
        if heads is not None:
            index = (*index, heads)
        current = h[index]
        if edit.kind == "add":
            new = (current.float() + alpha[:, None] * source.float()).to(h.dtype)
        else:
            weight = alpha[:, None].expand_as(current)
            if mask is not None:
                weight = weight * mask.to(weight.dtype)
            new = blend(current, source, weight)
        # Out of place: the input may also be a captured tensor of an earlier site.
        return h.index_put(index, new)
