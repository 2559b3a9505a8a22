"""The generic runtime: a ``transformers`` causal LM behind the engine's model surface.

:class:`TransformersModel` runs the model in ``transformers`` itself and offers what the
engine calls on a :class:`~patchserve.models.transformer.Transformer` — ``prefill``,
``extend``, ``resume``, ``run_blocks``, ``unembed``, ``forward``. Our hook sites are
forward hooks and pre-hooks (``adapters.py``) on the discovered modules (``discovery.py``),
installed for one pass and removed after it, each calling ``ctx.site(layer, hook, tensor,
layout)``:

* ``pre_attn`` / ``post_block``: the decoder layer's input / output;
* ``attn_out``: the attention module's output; ``mlp_in`` / ``mlp_out``: the MLP's input /
  output (offered only where ``probe.py`` found them to be the branches exactly);
* ``attn_head``: the input of the attention's output projection, split into heads.

A resumed pass (a sweep's cells) feeds the rows' residual into decoder layer ``l`` by a
pre-hook, the layers below it skipped, on the corrupt run's key/value cache cropped to the
rows' offset (rows grouped by offset: one ``transformers`` forward per group). The key/value
cache travels as a :class:`~patchserve.models.state.KVCache` and becomes a ``DynamicCache``
for each pass. Passes hold a lock: hooks and skipped layers are installed on shared modules.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import DynamicCache

from patchserve.errors import InvalidArgument
from patchserve.models.config import CheckpointError, ModelConfig
from patchserve.models.generic.adapters import (
    GivenHidden,
    SkippedLayer,
    attn_head_hook,
    attn_out_hook,
    input_tensor,
    mlp_in_hook,
    mlp_out_hook,
    output_tensor,
    post_block_hook,
    pre_attn_hook,
)
from patchserve.models.generic.discovery import Structure, text_config
from patchserve.models.hooks import HOOKS, HookContext, hook_unavailable
from patchserve.models.layout import Layout, ResumeRows
from patchserve.models.state import KVCache, Reuse
from patchserve.models.transformer import CachedPass, Transformer


class UnsupportedHook(InvalidArgument):
    """A hook the transformers runtime cannot provide exactly for this model (a 400)."""


def refuse_hook(hook: str, offered: tuple[str, ...], param: str = "hook") -> UnsupportedHook:
    return UnsupportedHook(hook_unavailable(hook, "transformers", offered), param)


class _GroupLayout:
    """Rows ``members`` of a resumed pass, padded ``[g, tmax, ...]``: row ``i`` holds its
    tokens from absolute position ``offsets[i]`` on, ``lengths[i]`` of them."""

    def __init__(
        self, members: torch.Tensor, total: int, offsets: torch.Tensor, lengths: torch.Tensor
    ) -> None:
        self.offsets, self.lengths = offsets, lengths
        self.slot = torch.full((total,), -1, dtype=torch.long, device=members.device)
        self.slot[members] = torch.arange(members.shape[0], device=members.device)

    def locate(
        self, rows: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        rows = rows.to(self.slot.device)
        inside = (rows >= 0) & (rows < self.slot.shape[0])
        slot = self.slot[rows.clamp(0, self.slot.shape[0] - 1)]
        mine = slot >= 0
        safe = slot.clamp(min=0)
        local = positions.to(rows.device) - self.offsets[safe]
        keep = inside & mine & (local >= 0) & (local < self.lengths[safe])
        return keep, (slot[keep], local[keep])


@dataclass
class _Group:
    """Resumed rows run in one ``transformers`` forward, right-padded to ``tmax`` tokens."""

    members: torch.Tensor  # long [g]: the rows' indices in the resumed batch
    offsets: torch.Tensor  # long [g]: each row's first absolute position
    lengths: torch.Tensor  # long [g]
    hidden: torch.Tensor  # [g, tmax, d]
    reuse: dict[str, torch.Tensor]  # "attn_out" / "attn_head" -> [g, tmax, ...]

    @property
    def uniform(self) -> bool:
        """Every row at one offset with one length (no padding, no per-row masks)."""
        return bool(
            (self.offsets == self.offsets[0]).all() and (self.lengths == self.lengths[0]).all()
        )


class TransformersModel(Transformer):
    """A ``transformers`` causal LM with our hook sites, for the engine (see the module doc)."""

    runtime = "transformers"

    def __init__(self, hf: nn.Module, structure: Structure, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)  # none of Transformer's own modules: hf holds the weights
        self.hf = hf
        self.structure = structure
        self.cfg = cfg
        embed = hf.get_input_embeddings()  # type: ignore[operator]
        if not isinstance(getattr(embed, "weight", None), torch.Tensor):
            raise CheckpointError(f"{cfg.architecture}: no input embedding matrix found")
        self.embed_tokens = embed
        self.device_map = None
        self.offered_hooks: tuple[str, ...] = ("pre_attn", "post_block")  # set by the probe
        self.layer_returns_tuple = False  # set by the probe
        # rows at different offsets in one padded forward (set by the probe where exact), and
        # the sliding window past which that is not (per-row masks shift slot indices)
        self.batch_offsets = False
        window = getattr(text_config(hf), "sliding_window", None)
        self.window: int | None = int(window) if window else None
        self._lock = threading.RLock()
        base = getattr(hf, structure.base_name)
        self.base = base
        params = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def output_device(self) -> torch.device:
        return self.device

    # -- the engine's entry points ----------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        hooks: HookContext | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[batch, tokens, vocab]`` of right-padded rows (``lengths`` real tokens)."""
        b, t = input_ids.shape
        device = input_ids.device
        full = torch.full((b,), t, dtype=torch.long, device=device)
        lengths = full if lengths is None else lengths.to(device)
        layout = Layout(torch.zeros_like(full), lengths, t, False)
        mask = (torch.arange(t, device=device)[None] < lengths[:, None]).long()
        positions = torch.arange(t, device=device).expand(b, -1)
        ctx = hooks if hooks is not None else HookContext()
        x = self._pass(ctx, layout, positions, DynamicCache(), input_ids=input_ids, mask=mask)
        return self.unembed(x)

    def prefill(self, input_ids: torch.Tensor, hooks: HookContext | None = None) -> CachedPass:
        return self._cached_pass(input_ids, None, hooks)

    def extend(
        self, input_ids: torch.Tensor, cache: KVCache, hooks: HookContext | None = None
    ) -> CachedPass:
        """``input_ids`` continuing the tokens of ``cache``; the cache returned holds the new
        tokens only (as the native runtime's)."""
        return self._cached_pass(input_ids, cache, hooks)

    def resume(
        self,
        rows: ResumeRows,
        start_layer: int,
        cache: KVCache | None = None,
        reuse: Reuse | None = None,
        hooks: HookContext | None = None,
        invariant: bool = False,
    ) -> torch.Tensor:
        """Last-token logits ``[rows, vocab]`` of ``rows`` entering block ``start_layer``.

        ``invariant`` is not honoured bit for bit (``transformers``' kernels decide); the
        engine's exact sweeps do not need it, and what does is refused for this runtime.
        """
        outputs = self._resumed(rows, start_layer, cache, reuse, hooks)
        last = rows.hidden.new_empty(rows.lengths.shape[0], self.cfg.hidden_size)
        for group, x in outputs:
            ends = (group.lengths - 1).to(x.device)
            last[group.members.to(last.device)] = x[torch.arange(x.shape[0], device=x.device), ends]
        return self.unembed(last)

    def run_blocks(
        self,
        rows: ResumeRows,
        start_layer: int,
        cache: KVCache | None = None,
        reuse: Reuse | None = None,
        hooks: HookContext | None = None,
        invariant: bool = False,
    ) -> torch.Tensor:
        """The residual of every token of ``rows`` after blocks ``start_layer..L-1``, in the
        rows' own layout (packed ``[N, d]`` or padded ``[rows, tokens, d]``)."""
        out = torch.zeros_like(rows.hidden)
        starts = (torch.cumsum(rows.lengths, 0) - rows.lengths).tolist()
        for group, x in self._resumed(rows, start_layer, cache, reuse, hooks):
            for i, (r, n) in enumerate(
                zip(group.members.tolist(), group.lengths.tolist(), strict=True)
            ):
                if rows.packed:
                    out[starts[r] : starts[r] + n] = x[i, :n]
                else:
                    out[r, :n] = x[i, :n]
        return out

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of a residual stream leaving the last block: the final norm, then the
        causal LM's own head (its ``lm_head`` and any logit scaling or soft-capping)."""
        norm = self.structure.final_norm
        assert norm is not None
        shape = hidden.shape
        x = hidden.to(self.device).reshape(1, -1, shape[-1])
        with self._lock, self._swapped(self.hf, self.structure.base_name, GivenHidden()):
            logits = self.hf(inputs_embeds=norm(x), use_cache=False).logits
        return logits.reshape(*shape[:-1], logits.shape[-1])

    # -- passes -----------------------------------------------------------------------

    def _cached_pass(
        self, input_ids: torch.Tensor, cache: KVCache | None, hooks: HookContext | None
    ) -> CachedPass:
        if input_ids.dim() != 2:
            raise ValueError("input_ids must be [batch, tokens]")
        b, t = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        dyn = self._prefix_cache(cache, start, b)
        offsets = torch.full((b,), start, dtype=torch.long, device=device)
        layout = Layout(offsets, torch.full((b,), t, dtype=torch.long, device=device), t, False)
        positions = (start + torch.arange(t, device=device)).expand(b, -1)
        ctx = hooks if hooks is not None else HookContext()
        x = self._pass(ctx, layout, positions, dyn, input_ids=input_ids)
        keys: list[torch.Tensor | None] = []
        values: list[torch.Tensor | None] = []
        for layer in dyn.layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            keep = isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[2] >= start + t
            keys.append(k[:, :, start:] if keep else None)  # type: ignore[index]
            values.append(v[:, :, start:] if keep else None)  # type: ignore[index]
        keys += [None] * (self.cfg.num_layers - len(keys))
        values += [None] * (self.cfg.num_layers - len(values))
        logits = self.unembed(x[:, -1])
        return CachedPass(logits, KVCache(keys, values), ctx.captured, x)

    def _resumed(
        self,
        rows: ResumeRows,
        start: int,
        cache: KVCache | None,
        reuse: Reuse | None,
        hooks: HookContext | None,
    ) -> list[tuple[_Group, torch.Tensor]]:
        """Each group of ``rows`` and its residual leaving the last block ``[g, length, d]``."""
        n = self.cfg.num_layers
        if not 0 <= start <= n:
            raise ValueError(f"start_layer must be in 0..{n}")
        ctx = hooks if hooks is not None else HookContext()
        groups = self._groups(rows, reuse)
        if ctx.capture and len(groups) > 1:
            raise ValueError("captures in a resumed pass need rows that share one offset")
        total = rows.lengths.shape[0]
        out = []
        for group in groups:
            if start == n:
                out.append((group, group.hidden))
                continue
            prefix = int(group.offsets.max())
            if prefix > 0 and (cache is None or cache.length < prefix):
                raise ValueError("a resumed row needs a cached prefix up to its offset")
            g, device = group.members.shape[0], group.hidden.device
            layout = _GroupLayout(group.members, total, group.offsets, group.lengths)
            dyn = self._prefix_cache(cache, prefix, g)
            tmax = group.hidden.shape[1]
            steps = torch.arange(tmax, device=device)[None]
            # padded slots repeat the row's last position (their values are never read)
            positions = group.offsets[:, None] + torch.minimum(steps, group.lengths[:, None] - 1)
            mask = None
            if not group.uniform:  # each row sees the cache before its offset, its own tokens
                cached = torch.arange(prefix, device=device)[None] < group.offsets[:, None]
                mask = torch.cat([cached, steps < group.lengths[:, None]], 1).long()
            x = self._pass(
                ctx,
                layout,
                positions,
                dyn,
                hidden=group.hidden,
                start=start,
                reuse=group.reuse,
                mask=mask,
            )
            out.append((group, x))
        return out

    def _groups(self, rows: ResumeRows, reuse: Reuse | None) -> list[_Group]:
        """The rows in forwards of their own: all in one (padded, each row masked to its own
        prefix) where the probe found that exact, else one forward per offset."""
        offsets, lengths = rows.offsets.tolist(), rows.lengths.tolist()
        if rows.prefix_lengths is not None and rows.prefix_lengths.tolist() != offsets:
            raise ValueError("the transformers runtime reads each row's prefix up to its offset")
        starts = (torch.cumsum(rows.lengths, 0) - rows.lengths).tolist()
        extra = {}
        if reuse is not None:
            extra = {
                name: t
                for name, t in (("attn_out", reuse.attn_out), ("attn_head", reuse.attn_head))
                if t is not None
            }

        def tokens(t: torch.Tensor, r: int) -> torch.Tensor:
            return t[starts[r] : starts[r] + lengths[r]] if rows.packed else t[r, : lengths[r]]

        def padded(t: torch.Tensor, members: list[int]) -> torch.Tensor:
            parts = [tokens(t, r) for r in members]
            tmax = max(p.shape[0] for p in parts)
            width = t.shape[1:] if rows.packed else t.shape[2:]
            out = t.new_zeros(len(parts), tmax, *width)
            for i, p in enumerate(parts):
                out[i, : p.shape[0]] = p
            return out

        end = max(o + n for o, n in zip(offsets, lengths, strict=True))
        together = self.batch_offsets and (self.window is None or end <= self.window)
        by_key: dict[tuple[int, int], list[int]] = {}
        for r, key in enumerate(zip(offsets, lengths, strict=True)):
            by_key.setdefault((0, 0) if together else key, []).append(r)
        device = rows.hidden.device
        return [
            _Group(
                torch.tensor(members, device=device),
                rows.offsets[members],
                rows.lengths[members],
                padded(rows.hidden, members),
                {k: padded(t, members) for k, t in extra.items()},
            )
            for members in by_key.values()
        ]

    def _prefix_cache(self, cache: KVCache | None, length: int, batch: int) -> DynamicCache:
        """A ``DynamicCache`` of the first ``length`` tokens of ``cache`` for ``batch`` rows."""
        if cache is None or length == 0:
            return DynamicCache()
        data: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        for k, v in zip(cache.keys, cache.values, strict=True):
            if k is None or v is None:
                data.append((None, None))
                continue
            k, v = k[:, :, :length], v[:, :, :length]
            if k.shape[0] != batch:
                k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
            data.append((k, v))
        return DynamicCache(ddp_cache_data=data)

    def _pass(
        self,
        ctx: HookContext,
        layout: Any,
        positions: torch.Tensor,
        cache: DynamicCache,
        *,
        input_ids: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        start: int = 0,
        reuse: dict[str, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder layers ``start..L-1`` of ``transformers``' own forward with our sites; the
        residual leaving the last block. ``hidden`` enters layer ``start`` (the layers below
        are skipped), else ``input_ids`` are embedded by the model."""
        self._check_hooks(ctx)
        out: dict[str, torch.Tensor] = {}
        kwargs: dict[str, Any] = {self._cache_arg: cache, "position_ids": positions}
        if hidden is not None:
            kwargs["inputs_embeds"] = torch.zeros_like(hidden)  # replaced when layer start runs
        else:
            kwargs["input_ids"] = input_ids
        if mask is not None:
            kwargs["attention_mask"] = mask
        with self._lock:
            handles = self._install(ctx, layout, start, hidden, reuse or {}, out)
            try:
                with self._skipping(start):
                    self.base(use_cache=True, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
        return out["hidden"]

    def _check_hooks(self, ctx: HookContext) -> None:
        for _, hook in (*ctx.edits, *ctx.capture):
            if hook not in self.offered_hooks:
                raise refuse_hook(hook, self.offered_hooks)

    @contextmanager
    def _skipping(self, start: int) -> Iterator[None]:
        """Layers ``0..start-1`` replaced by pass-throughs for one pass."""
        layers = self.structure.layers
        kept = [layers[i] for i in range(start)]
        try:
            for i, layer in enumerate(kept):
                layers[i] = SkippedLayer(layer, self.layer_returns_tuple)
            yield
        finally:
            for i, layer in enumerate(kept):
                layers[i] = layer

    @staticmethod
    @contextmanager
    def _swapped(owner: nn.Module, name: str, module: nn.Module) -> Iterator[None]:
        kept = getattr(owner, name)
        setattr(owner, name, module)
        try:
            yield
        finally:
            setattr(owner, name, kept)

    def _install(
        self,
        ctx: HookContext,
        layout: Any,
        start: int,
        hidden: torch.Tensor | None,
        reuse: dict[str, torch.Tensor],
        out: dict[str, torch.Tensor],
    ) -> list[RemovableHandle]:
        """Forward hooks of one pass on layers ``start..L-1``; ``out["hidden"]`` receives the
        last layer's output."""
        s, n = self.structure, self.cfg.num_layers
        handles: list[RemovableHandle] = []

        def site(layer: int, hook: str, h: torch.Tensor) -> torch.Tensor:
            h = ctx.site(layer, hook, h, layout)
            if (layer, hook) in ctx.capture:  # a copy: transformers may reuse h in place
                ctx.captured[layer, hook] = h.clone()
            return h

        def wanted(layer: int, hook: str) -> bool:
            return (layer, hook) in ctx.edits or (layer, hook) in ctx.capture

        for i in range(start, n):
            layer = s.layers[i]
            given = hidden if i == start else None
            handles.append(
                layer.register_forward_pre_hook(pre_attn_hook(i, given, site), with_kwargs=True)
            )
            if wanted(i, "post_block") or i == n - 1:
                keep = out if i == n - 1 else None
                handles.append(layer.register_forward_hook(post_block_hook(i, site, keep)))
            own = reuse if i == start else {}
            attention, mlp, proj = s.attention[i], s.mlp[i], s.out_proj[i]
            if attention is not None and (wanted(i, "attn_out") or "attn_out" in own):
                hook = attn_out_hook(i, site, own.get("attn_out"))
                handles.append(attention.register_forward_hook(hook))
            if proj is not None and (wanted(i, "attn_head") or "attn_head" in own):
                hook = attn_head_hook(i, site, own.get("attn_head"), self.cfg)
                handles.append(proj.register_forward_pre_hook(hook, with_kwargs=True))
            if mlp is not None and wanted(i, "mlp_in"):
                hook = mlp_in_hook(i, site)
                handles.append(mlp.register_forward_pre_hook(hook, with_kwargs=True))
            if mlp is not None and wanted(i, "mlp_out"):
                handles.append(mlp.register_forward_hook(mlp_out_hook(i, site)))
        return handles


__all__ = ["HOOKS", "TransformersModel", "UnsupportedHook", "input_tensor", "output_tensor"]
