"""The hooked decoder-only transformer and its forward entry points.

``Transformer.forward`` is the single entry point; its arguments select the
variants the sweep engine and the server need:

* a full forward of token ids (optionally returning the key/value cache);
* a forward of a *suffix* of tokens on top of a :class:`KVCache` of the prefix,
  where a batch-1 cache is shared by every row without copying and each row
  may see a different prefix length (``prefix_lengths``);
* a forward that *starts at layer l* from a supplied residual stream
  (``hidden``, the ``pre_attn`` input of block ``l``);
* logits only where they are read (``logits_at``), or none at all.

Interventions and captures travel in a :class:`HookContext`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from patchserve.cancel import raise_if_cancelled
from patchserve.models.attention import AttentionMasks
from patchserve.models.block import DecoderBlock
from patchserve.models.config import ModelConfig, RopeConfig
from patchserve.models.hooks import HookContext
from patchserve.models.layers import Rotary, make_norm


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
class ForwardResult:
    logits: torch.Tensor | None  # [batch, k, vocab] at the requested positions
    captured: dict[tuple[int, str], torch.Tensor]
    kv: KVCache | None  # keys/values of the tokens this pass computed
    hidden: torch.Tensor  # residual stream leaving the last block run, before the final norm


@dataclass
class Reuse:
    """Activations a resumed first block may take instead of recomputing attention."""

    attn_out: torch.Tensor | None = None
    attn_head: torch.Tensor | None = None


@dataclass
class AttentionGroup:
    """Rows attended together: padded to their longest row, reading prefix keys ``< limit``.

    ``tokens`` is the group's slice of a packed pass (None for a padded pass,
    which is one group of every row).
    """

    rows: slice
    tokens: slice | None
    offsets: torch.Tensor  # [rows]
    lengths: torch.Tensor  # [rows]
    prefix_lengths: torch.Tensor | None  # [rows]
    prefix_limit: int
    tmax: int
    row_of: torch.Tensor | None = None  # packed: group-local row of each token
    local_of: torch.Tensor | None = None  # packed: index of each token within its row

    @property
    def grid(self) -> torch.Tensor:
        """Absolute position of every padded slot, ``[rows, tmax]``."""
        return self.offsets[:, None] + torch.arange(self.tmax, device=self.offsets.device)[None]

    @property
    def padded(self) -> bool:
        return bool((self.lengths < self.tmax).any())

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            return t
        out = t.new_zeros(self.lengths.shape[0], self.tmax, *t.shape[1:])
        return out.index_put_((self.row_of, self.local_of), t[self.tokens])

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.tokens is None else t[self.row_of, self.local_of]


# A packed group closes when a row is this much shorter than its first row and the
# group already holds this many padded query slots (so short tails stay together).
GROUP_SHRINK = 0.7
GROUP_MIN_SLOTS = 256


class Layout:
    """Where the tokens of one pass live.

    *Padded*: ``[batch, tmax, ...]``, row ``b`` real for its first
    ``lengths[b]`` tokens. *Packed*: ``[N, ...]``, the rows' real tokens back to
    back (no padding, so every projection and MLP runs on real tokens only).
    Attention runs per :class:`AttentionGroup`: packed rows of similar length
    (callers order rows longest first) are padded together, so the attention
    of short rows does not pay for the longest row.
    """

    def __init__(
        self,
        offsets: torch.Tensor,
        lengths: torch.Tensor,
        tmax: int,
        packed: bool,
        prefix_lengths: torch.Tensor | None = None,
        prefix_total: int = 0,
    ) -> None:
        self.offsets, self.lengths, self.tmax, self.packed = offsets, lengths, tmax, packed
        self.batch = offsets.shape[0]
        device = offsets.device
        if packed:
            self.starts = torch.cumsum(lengths, 0) - lengths
            row_of = torch.repeat_interleave(torch.arange(self.batch, device=device), lengths)
            self.positions = offsets[row_of] + (
                torch.arange(int(lengths.sum()), device=device) - self.starts[row_of]
            )
            self.groups = self._packed_groups(prefix_lengths)
        else:
            self.positions = offsets[:, None] + torch.arange(tmax, device=device)[None]
            self.groups = [
                AttentionGroup(
                    slice(0, self.batch), None, offsets, lengths, prefix_lengths, prefix_total, tmax
                )
            ]

    def _packed_groups(self, prefix_lengths: torch.Tensor | None) -> list[AttentionGroup]:
        lengths = self.lengths.tolist()
        bounds, first = [0], 0
        for r in range(1, len(lengths)):
            slots = (r - first) * lengths[first]
            if lengths[r] < GROUP_SHRINK * lengths[first] and slots >= GROUP_MIN_SLOTS:
                bounds.append(r)
                first = r
        bounds.append(len(lengths))
        starts = self.starts.tolist()
        groups = []
        for a, b in itertools.pairwise(bounds):
            lens = self.lengths[a:b]
            row_of = torch.repeat_interleave(torch.arange(b - a, device=lens.device), lens)
            local_of = torch.cat([torch.arange(n, device=lens.device) for n in lengths[a:b]])
            plens = prefix_lengths[a:b] if prefix_lengths is not None else None
            groups.append(
                AttentionGroup(
                    rows=slice(a, b),
                    tokens=slice(starts[a], starts[b - 1] + lengths[b - 1]),
                    offsets=self.offsets[a:b],
                    lengths=lens,
                    prefix_lengths=plens,
                    prefix_limit=int(plens.max()) if plens is not None else 0,
                    tmax=max(lengths[a:b]),
                    row_of=row_of,
                    local_of=local_of,
                )
            )
        return groups

    def locate(
        self, rows: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        safe = rows.clamp(0, self.batch - 1)
        local = positions - self.offsets[safe]
        keep = (rows < self.batch) & (local >= 0) & (local < self.lengths[safe])
        rows, local = rows[keep], local[keep]
        if self.packed:
            return keep, (self.starts[rows] + local,)
        return keep, (rows, local)

    def narrow(self) -> Layout:
        """The packed layout of the rows' last tokens."""
        ones = torch.ones_like(self.lengths)
        return Layout(self.offsets + self.lengths - 1, ones, 1, packed=True)

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """The last real token of each row: ``[batch, 1, ...]``."""
        if self.packed:
            return x[self.starts + self.lengths - 1][:, None]
        return x[torch.arange(self.batch, device=x.device), self.lengths - 1][:, None]


@dataclass
class PassState:
    """What the blocks of one forward pass share: layout, masks, rotary tables, caches, hooks.

    ``narrow_layer``: the block from whose attention on only the rows' last
    tokens are computed (the pass's final block when only last-token logits
    are read and nothing there is captured); its keys and values still cover
    every token.
    """

    hooks: HookContext
    layout: Layout
    prefix: KVCache | None
    rotaries: dict[RopeConfig, Rotary]
    dtype: torch.dtype
    keep_cache: bool
    narrow_layer: int | None = None
    new_keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _tables: dict[tuple[RopeConfig, bool], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )
    _masks: dict[tuple[int, int | None, bool], AttentionMasks] = field(default_factory=dict)

    def narrows(self, layer: int) -> bool:
        return layer == self.narrow_layer

    def narrowed(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the rows' last tokens ``[rows, ...]`` on the narrowed block, else as is."""
        return self.layout.last(x)[:, 0] if layer == self.narrow_layer else x

    def rope_tables(
        self, rope: RopeConfig | None, narrow: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if rope is None:
            return None
        key = (rope, narrow)
        if key not in self._tables:
            layout = self.layout
            positions = layout.offsets + layout.lengths - 1 if narrow else layout.positions
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

    def masks(self, group_index: int, window: int | None, narrow: bool = False) -> AttentionMasks:
        key = (group_index, window, narrow)
        if key not in self._masks:
            group = self.layout.groups[group_index]
            self._masks[key] = self._build_masks(group, window, narrow)
        return self._masks[key]

    def _build_masks(
        self, group: AttentionGroup, window: int | None, narrow: bool
    ) -> AttentionMasks:
        kpos = group.grid  # [b, t_k]
        qpos = (group.offsets + group.lengths - 1)[:, None] if narrow else kpos
        device = kpos.device
        plen = min(group.prefix_limit, self.prefix.length) if self.prefix is not None else 0
        window_binds = window is not None and int(kpos.max()) >= window
        if plen == 0 and not group.padded and not window_binds and not narrow:
            return AttentionMasks(None, None, causal_only=True)
        slots = torch.arange(kpos.shape[1], device=device)
        real = slots[None, :] < group.lengths[:, None]  # [b, t]
        new = (kpos[:, None, :] <= qpos[:, :, None]) & real[:, None, :]  # causal by position
        if window is not None and window_binds:
            new = new & (qpos[:, :, None] - kpos[:, None, :] < window)
        if not narrow:
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


LogitsAt = Literal["last", "all"] | torch.Tensor | None


class Transformer(nn.Module):
    """A decoder-only LM built from a :class:`ModelConfig`; weights come from a family loader."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.embed_positions = (
            nn.Embedding(cfg.max_position_embeddings, d) if cfg.learned_positions else None
        )
        self.blocks = nn.ModuleList(DecoderBlock(cfg, layer) for layer in range(cfg.num_layers))
        self.final_norm = make_norm(cfg.norm_kind, d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        ropes = sorted({r for r in cfg.rope if r is not None}, key=repr)
        self._rotaries = {r: Rotary(r) for r in ropes}
        self.rotary_modules = nn.ModuleList(self._rotaries.values())  # registered as submodules

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The residual stream entering block 0 (before its ``pre_attn`` hook)."""
        x = self.embed_tokens(input_ids)
        if self.cfg.embed_scale is not None:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        return x

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of a residual stream leaving the last block."""
        logits = self.lm_head(self.final_norm(hidden))
        cap = self.cfg.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        start_layer: int = 0,
        reuse: Reuse | None = None,
        offsets: torch.Tensor | int | None = None,
        lengths: torch.Tensor | None = None,
        cache: KVCache | None = None,
        prefix_lengths: torch.Tensor | None = None,
        hooks: HookContext | None = None,
        logits_at: LogitsAt = "last",
        return_kv: bool = False,
        narrow_last: bool = False,
    ) -> ForwardResult:
        """Run blocks ``start_layer..L-1`` over a batch of token rows.

        Rows are either padded — ``input_ids`` ``[batch, tokens]`` / ``hidden``
        ``[batch, tokens, d]``, right-padded to ``lengths`` — or packed —
        ``input_ids`` ``[N]`` / ``hidden`` ``[N, d]`` holding the rows back to back,
        with ``lengths`` (required) giving each row's token count.

        Args:
            input_ids: token ids (with ``start_layer == 0``).
            hidden: residual stream entering block ``start_layer`` (instead of ids).
            reuse: unchanged attention output of block ``start_layer`` (see :class:`Reuse`).
            offsets: absolute position of each row's first token; defaults to
                the cache length (0 without a cache).
            lengths: real tokens per row; defaults to all (padded input).
            cache: keys/values of the prefix, batch 1 (shared) or ``batch``.
            prefix_lengths: how many prefix tokens each row sees; defaults to ``offsets``.
            hooks: interventions to apply and sites to capture.
            logits_at: ``"last"`` (last real token of each row, ``[batch, 1, V]``),
                ``"all"`` (every token, in the input's layout), a ``[batch, k]``
                tensor of token indices (padded input), or None for no logits.
            return_kv: also return the keys/values of the computed tokens
                (padded ``[batch, kv_heads, tokens, head_dim]``).
            narrow_last: with ``logits_at="last"``, run the final block's queries,
                output projection and MLP for the rows' last tokens only (their
                keys and values still cover every token). Same values up to float
                rounding; ``hidden`` is then ``[batch, d]``. Ignored when the final
                block is captured or keys/values are returned.
        """
        if (input_ids is None) == (hidden is None):
            raise ValueError("pass exactly one of input_ids and hidden")
        if input_ids is not None and start_layer != 0:
            raise ValueError("input_ids start at layer 0; pass hidden to start higher")
        ref = input_ids if input_ids is not None else hidden
        assert ref is not None
        packed = ref.dim() == (1 if input_ids is not None else 2)
        device = ref.device
        if packed:
            if lengths is None:
                raise ValueError("packed rows need lengths")
            if int(lengths.sum()) != ref.shape[0]:
                raise ValueError("packed rows: lengths must add up to the token count")
            b, t = lengths.shape[0], int(lengths.max())
        else:
            b, t = ref.shape[:2]
        if offsets is None:
            offsets = cache.length if cache is not None else 0
        offsets_t = torch.as_tensor(offsets, dtype=torch.long, device=device).reshape(-1)
        offsets_t = offsets_t.expand(b) if offsets_t.shape[0] == 1 else offsets_t
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=device)
        if prefix_lengths is None and cache is not None:
            prefix_lengths = offsets_t
        prefix_total = cache.length if cache is not None else 0
        layout = Layout(offsets_t, lengths.to(device), t, packed, prefix_lengths, prefix_total)
        if return_kv and len(layout.groups) > 1:
            raise ValueError("return_kv needs rows of one attention group (padded rows)")
        hooks = hooks if hooks is not None else HookContext()
        hooks.layout = layout
        last = self.cfg.num_layers - 1
        narrow = (
            narrow_last
            and isinstance(logits_at, str)
            and logits_at == "last"
            and not return_kv
            and start_layer <= last
            and not any(layer == last for layer, _ in hooks.capture)
        )
        state = PassState(
            hooks=hooks,
            layout=layout,
            prefix=cache,
            rotaries=self._rotaries,
            dtype=self.dtype,
            keep_cache=return_kv,
            narrow_layer=last if narrow else None,
        )
        x = self.embed(input_ids, layout.positions) if input_ids is not None else hidden
        assert x is not None
        for block in self.blocks[start_layer:]:
            raise_if_cancelled()  # a long batch stops within one block of a cancel
            x = block(x, state, reuse if block.layer == start_layer else None)
        logits = None
        if logits_at is not None:
            if isinstance(logits_at, str) and logits_at == "all":
                picked = x
            elif narrow:
                picked = x[:, None]  # the final block already kept the last tokens only
            elif isinstance(logits_at, str) and logits_at == "last":
                picked = layout.last(x)
            else:
                if packed:
                    raise ValueError("token indices for logits need padded rows")
                index = torch.as_tensor(logits_at, dtype=torch.long, device=device)
                picked = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
            logits = self.unembed(picked)
        kv = None
        if return_kv:
            n = self.cfg.num_layers
            kv = KVCache(
                [state.new_keys[i][0] if i in state.new_keys else None for i in range(n)],
                [state.new_keys[i][1] if i in state.new_keys else None for i in range(n)],
            )
        return ForwardResult(logits=logits, captured=hooks.captured, kv=kv, hidden=x)
