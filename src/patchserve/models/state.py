"""The state of one forward pass: the key/value cache it reads and fills, what a resumed
block reuses, and the per-pass tables (layout, masks, rope) that every block shares."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from patchserve.models.attention import AttentionMasks
from patchserve.models.config import RopeConfig
from patchserve.models.hooks import HookContext
from patchserve.models.layers import Rotary, check_rope_positions, rope_position_limit
from patchserve.models.layout import AttentionGroup, Layout


@dataclass
class KVCache:
    """Rotated keys and values per layer, ``[batch, kv_heads, tokens, head_dim]``.

    Layers that a pass did not compute (it started above them) hold ``None``.
    """

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]

    @property
    def length(self) -> int:
        for k in self.keys:
            if k is not None:
                return k.shape[2]
        return 0

    @property
    def batch(self) -> int:
        for k in self.keys:
            if k is not None:
                return k.shape[0]
        return 0

    def extend(self, other: KVCache) -> KVCache:
        """This cache followed by ``other`` along the token axis (a decoding step)."""
        keys, values = [], []
        for k0, v0, k1, v1 in zip(self.keys, self.values, other.keys, other.values, strict=True):
            keys.append(k1 if k0 is None else k0 if k1 is None else torch.cat((k0, k1), 2))
            values.append(v1 if v0 is None else v0 if v1 is None else torch.cat((v0, v1), 2))
        return KVCache(keys, values)

    def nbytes(self) -> int:
        tensors = [t for t in self.keys + self.values if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class KVBlock:
    """One preallocated key/value block for the rows of a batched generation.

    Per layer ``[rows, kv_heads, slots, head_dim]`` (allocated, zeroed, on the
    layer's device at its first write): row ``r`` keeps the key of its
    position ``p`` in slot ``p``. A pass writes its tokens' keys in place at
    their positions (rows may sit at different positions), then attends the
    slots ``< end`` (``end``: set per pass). The generation scheduler's rows live in
    views of it (:mod:`patchserve.engine.generation.blockrows`: rows that leave are
    filled from the end, never a copy per step).
    """

    num_layers: int
    rows: int
    slots: int
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    end: int = 0

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    def write(
        self, layer: int, grid: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values ``[rows, t, KV, D]`` at positions ``grid`` ``[rows, t]``; return
        the layer's keys and values of slots ``< end`` (views, ``[rows, KV, end, D]``)."""
        kb, vb = self.keys[layer], self.values[layer]
        if kb is None or vb is None:
            shape = (self.rows, k.shape[2], self.slots, k.shape[3])
            kb = self.keys[layer] = k.new_zeros(shape)  # zeros: masked slots stay finite
            vb = self.values[layer] = v.new_zeros(shape)
        rows = torch.arange(grid.shape[0], device=grid.device)[:, None]
        kb[rows, :, grid] = k
        vb[rows, :, grid] = v
        return kb[:, :, : self.end], vb[:, :, : self.end]


@dataclass
class Reuse:
    """Activations a resumed first block may take instead of recomputing attention."""

    attn_out: torch.Tensor | None = None
    attn_head: torch.Tensor | None = None

    def to(self, device: torch.device) -> Reuse:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Reuse(move(self.attn_out), move(self.attn_head))


@dataclass
class PassState:
    """What the blocks of one forward pass share: layout, masks, rotary tables, caches, hooks.

    ``site`` runs a hook site on a tensor in the pass's layout; ``last_site`` on
    one holding each row's last token only (a final block that computes those
    alone, see :meth:`~patchserve.models.block.DecoderBlock.forward_last`).
    """

    hooks: HookContext
    layout: Layout
    prefix: KVCache | None
    rotaries: dict[RopeConfig, Rotary]
    dtype: torch.dtype
    keep_cache: bool
    block: KVBlock | None = None  # a batched generation's preallocated cache (written in place)
    new_keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _tables: dict[tuple[RopeConfig, bool], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )
    _masks: dict[tuple[int, int | None, bool], AttentionMasks] = field(default_factory=dict)
    _last_layout: Layout | None = None
    _views: dict[torch.device, PassState] = field(default_factory=dict)
    _root: PassState | None = None

    def on(self, device: torch.device) -> PassState:
        """This pass as seen by a layer on ``device`` (a device map): the same hooks, caches
        and kept keys; layout and masks there, rotary tables copied from the first device."""
        root = self._root or self
        if device == root.layout.device:
            return root
        if device not in root._views:
            root._views[device] = replace(
                root,
                layout=root.layout.to(device),
                _tables={},
                _masks={},
                _last_layout=None,
                _views={},
                _root=root,
            )
        return root._views[device]

    def site(self, layer: int, hook: str, h: torch.Tensor) -> torch.Tensor:
        return self.hooks.site(layer, hook, h, self.layout)

    def last_site(self, layer: int, hook: str, h: torch.Tensor) -> torch.Tensor:
        if self._last_layout is None:
            self._last_layout = self.layout.narrow()
        return self.hooks.site(layer, hook, h, self._last_layout)

    def last_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's last real token of ``x``: ``[rows, ...]``."""
        return self.layout.last(x)[:, 0]

    def cache(self, num_layers: int) -> KVCache:
        """The keys and values this pass kept (``keep_cache``), as a cache of its tokens."""
        pairs = [self.new_keys.get(i) for i in range(num_layers)]
        return KVCache(
            [p[0] if p is not None else None for p in pairs],
            [p[1] if p is not None else None for p in pairs],
        )

    def rope_tables(
        self, rope: RopeConfig | None, last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary tables of every token, or (``last``) of each row's last token."""
        if rope is None:
            return None
        key = (rope, last)
        if key not in self._tables:
            if self._root is not None:  # computed once, copied: every device sees the same bits
                tables = self._root.rope_tables(rope, last)
                assert tables is not None
                self._tables[key] = (
                    tables[0].to(self.layout.device),
                    tables[1].to(self.layout.device),
                )
                return self._tables[key]
            layout = self.layout
            ends = layout.offsets + layout.lengths
            if rope_position_limit(rope) is not None and ends.numel():  # LongRoPE's limit
                check_rope_positions(rope, int(ends.max()) - 1)
            positions = layout.offsets + layout.lengths - 1 if last else layout.positions
            self._tables[key] = self.rotaries[rope].tables(positions, self.dtype)
        return self._tables[key]

    def keep_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.keep_cache:
            self.new_keys[layer] = (k, v)

    def prefix_kv(
        self, layer: int, limit: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.prefix is None:
            return None
        k, v = self.prefix.keys[layer], self.prefix.values[layer]
        if k is None or v is None:
            raise ValueError(f"the prefix cache has no keys for layer {layer}")
        if limit is not None and limit < k.shape[2]:
            k, v = k[:, :, :limit], v[:, :, :limit]
        return k, v

    def absolute_kv(
        self, layer: int, group: AttentionGroup, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[rows, kv_heads, end, head_dim]`` of a group in absolute geometry:
        the cached prefix before each row's first token, the row's own new keys from there."""
        end = self.layout.end
        own_k, own_v = group.place(k, end), group.place(v, end)  # [rows, end, KV, D]
        prefix = self.prefix_kv(layer)
        if prefix is not None:
            pk, pv = prefix
            if pk.shape[0] != 1:
                raise ValueError("absolute attention shares one cached prefix (batch 1)")
            n = min(pk.shape[2], end)
            slots = torch.arange(n, device=own_k.device)
            before = (slots[None, :] < group.offsets[:, None])[:, :, None, None]  # [rows, n]
            own_k[:, :n] = torch.where(before, pk[0, :, :n].transpose(0, 1)[None], own_k[:, :n])
            own_v[:, :n] = torch.where(before, pv[0, :, :n].transpose(0, 1)[None], own_v[:, :n])
        return own_k.transpose(1, 2), own_v.transpose(1, 2)

    def block_masks(self, window: int | None) -> AttentionMasks:
        """Masks of a pass on a :class:`KVBlock`: each query (row, position ``q``) sees the
        row's slots ``j <= q`` written by its real tokens (and ``q - j < window``); a padded
        query slot sees itself."""
        key = (-2, window, False)
        if key not in self._masks:
            assert self.block is not None
            layout = self.layout
            j = torch.arange(self.block.end, device=layout.device)
            q = layout.positions[:, :, None]  # [rows, t, 1]
            real = (layout.offsets + layout.lengths)[:, None, None]
            allowed = (j <= q) & (j < real)
            if window is not None:
                allowed = allowed & (q - j < window)
            # A padded query slot sees itself only, so its (unused) keys and values stay
            # finite and never poison a real query through a masked-out NaN value.
            allowed = allowed | ((j == q) & (q >= real))
            self._masks[key] = AttentionMasks(allowed[:, None], None, False)
        return self._masks[key]

    def absolute_masks(self, window: int | None, last: bool) -> AttentionMasks:
        """Masks of absolute geometry: causal (or the last slot's) over ``end`` slots."""
        key = (-1, window, last)
        if key not in self._masks:
            end, device = self.layout.end, self.layout.device
            if window is None or end - 1 < window:  # the window does not bind
                self._masks[key] = AttentionMasks(None, None, causal_only=not last)
            else:
                j = torch.arange(end, device=device)
                i = j[-1:, None] if last else j[:, None]  # query slots
                self._masks[key] = AttentionMasks((j <= i) & (i - j < window), None, False)
        return self._masks[key]

    def masks(self, group_index: int, window: int | None, last: bool = False) -> AttentionMasks:
        """Masks of one attention group; ``last``: for queries of each row's last token."""
        key = (group_index, window, last)
        if key not in self._masks:
            group = self.layout.groups[group_index]
            self._masks[key] = self._build_masks(group, window, last)
        return self._masks[key]

    def _build_masks(self, group: AttentionGroup, window: int | None, last: bool) -> AttentionMasks:
        kpos = group.grid  # [b, t_k]
        qpos = (group.offsets + group.lengths - 1)[:, None] if last else kpos
        device = kpos.device
        plen = min(group.prefix_limit, self.prefix.length) if self.prefix is not None else 0
        window_binds = window is not None and int(kpos.max()) >= window
        if plen == 0 and not group.padded and not window_binds and not last:
            return AttentionMasks(None, None, causal_only=True)
        slots = torch.arange(kpos.shape[1], device=device)
        real = slots[None, :] < group.lengths[:, None]  # [b, t]
        new = (kpos[:, None, :] <= qpos[:, :, None]) & real[:, None, :]  # causal by position
        if window is not None and window_binds:
            new = new & (qpos[:, :, None] - kpos[:, None, :] < window)
        if not last:
            # A padded query slot sees itself only, so its (unused) output stays finite
            # and never poisons a real query through a masked-out NaN value.
            eye = slots[None, :, None] == slots[None, None, :]
            new = new | (eye & ~real[:, :, None])
        prefix = None
        if plen:
            j = torch.arange(plen, device=device)
            limit = group.prefix_lengths if group.prefix_lengths is not None else group.offsets
            prefix = (j[None, None, :] < limit[:, None, None]).expand(-1, qpos.shape[1], -1)
            if window is not None and window_binds:
                prefix = prefix & (qpos[:, :, None] - j[None, None, :] < window)
            prefix = prefix[:, None]
        return AttentionMasks(new[:, None], prefix, causal_only=False)
