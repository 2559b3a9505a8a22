"""Where a pass's tokens sit: rows packed back to back (no padding in any projection or
MLP) or padded, their absolute positions, and the attention groups of similar-length rows
that attention pads locally; the layout of the rows' last tokens for a final block that
computes only those; and :class:`ResumeRows`, the validated rows a resumed pass starts from."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


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

    def place(self, t: torch.Tensor, end: int) -> torch.Tensor:
        """The group's packed tokens of ``t`` at their absolute slots of ``[rows, end, ...]``
        (zeros elsewhere): every row laid out the same way, whatever its length."""
        assert self.tokens is not None and self.row_of is not None
        out = t.new_zeros(self.lengths.shape[0], end, *t.shape[1:])
        return out.index_put_((self.row_of, self.absolute_of), t[self.tokens])

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The group's tokens back out of absolute slots ``[rows, end, ...]``, packed."""
        return t[self.row_of, self.absolute_of]

    @property
    def absolute_of(self) -> torch.Tensor:
        """Packed: the absolute position of each of the group's tokens."""
        assert self.row_of is not None and self.local_of is not None
        return self.offsets[self.row_of] + self.local_of


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
        absolute: bool = False,
    ) -> None:
        self.offsets, self.lengths, self.tmax, self.packed = offsets, lengths, tmax, packed
        self._prefix = (prefix_lengths, prefix_total)
        self.absolute = absolute
        if absolute:
            self.end = self._common_end(prefix_lengths, prefix_total)
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

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def to(self, device: torch.device) -> Layout:
        """The same layout with its index tensors on ``device`` (a layer on another device)."""
        plens, total = self._prefix
        return Layout(
            self.offsets.to(device),
            self.lengths.to(device),
            self.tmax,
            self.packed,
            plens.to(device) if plens is not None else None,
            total,
            self.absolute,
        )

    def _common_end(self, prefix_lengths: torch.Tensor | None, prefix_total: int) -> int:
        """Absolute geometry (:mod:`~patchserve.models.invariance`): packed rows that all end
        at one position, each reading the cached prefix up to its own first token."""
        ends = (self.offsets + self.lengths).tolist()
        if not self.packed or len(set(ends)) != 1:
            raise ValueError("absolute attention needs packed rows that end together")
        if prefix_lengths is not None and not torch.equal(prefix_lengths, self.offsets):
            raise ValueError("absolute attention reads the prefix up to each row's offset")
        if int(self.offsets.max()) > prefix_total:
            raise ValueError("absolute attention needs a cached prefix up to every row's offset")
        return int(ends[0])

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


@dataclass(frozen=True)
class ResumeRows:
    """The residual rows a resumed pass starts from, checked once when built.

    Packed: ``hidden`` ``[N, d]`` holds the rows' real tokens back to back.
    Padded: ``hidden`` ``[rows, tokens, d]``, row ``r`` real for its first
    ``lengths[r]`` tokens. ``offsets`` is each row's first absolute position;
    ``prefix_lengths`` how many cached prefix tokens each row sees (its offset
    when left out).
    """

    hidden: torch.Tensor
    offsets: torch.Tensor  # [rows]
    lengths: torch.Tensor  # [rows]
    tmax: int
    packed: bool
    prefix_lengths: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        hidden: torch.Tensor,
        offsets: torch.Tensor | int = 0,
        lengths: torch.Tensor | None = None,
        prefix_lengths: torch.Tensor | None = None,
    ) -> ResumeRows:
        """Rows of ``hidden``: packed when it is ``[N, d]`` (``lengths`` required), else padded."""
        if hidden.dim() not in (2, 3):
            raise ValueError("hidden must be packed [tokens, d] or padded [rows, tokens, d]")
        packed = hidden.dim() == 2
        device = hidden.device
        if lengths is None:
            if packed:
                raise ValueError("packed rows need lengths")
            lengths = torch.full((hidden.shape[0],), hidden.shape[1], device=device)
        lengths = lengths.to(device=device, dtype=torch.long)
        lens = lengths.tolist()
        if lengths.dim() != 1 or not lens or min(lens) < 1:
            raise ValueError("lengths must be a non-empty vector of positive token counts")
        if packed and sum(lens) != hidden.shape[0]:
            raise ValueError("packed rows: lengths must add up to the token count")
        if not packed and (hidden.shape[0] != len(lens) or max(lens) > hidden.shape[1]):
            raise ValueError("padded rows: one length per row, none above the row width")
        offsets_t = torch.as_tensor(offsets, dtype=torch.long, device=device).reshape(-1)
        if offsets_t.shape[0] not in (1, len(lens)):
            raise ValueError("offsets: one per row, or one for all")
        if prefix_lengths is not None and prefix_lengths.shape != lengths.shape:
            raise ValueError("prefix_lengths: one per row")
        tmax = max(lens) if packed else hidden.shape[1]
        return cls(hidden, offsets_t.expand(len(lens)), lengths, tmax, packed, prefix_lengths)

    def layout(self, prefix_total: int | None, absolute: bool = False) -> Layout:
        """Where these rows sit on a cached prefix of ``prefix_total`` tokens (None: no cache);
        ``absolute``: attention in absolute geometry (a batch-invariant pass)."""
        plens = self.prefix_lengths
        if plens is None and prefix_total is not None:
            plens = self.offsets
        total = prefix_total or 0
        return Layout(self.offsets, self.lengths, self.tmax, self.packed, plens, total, absolute)
