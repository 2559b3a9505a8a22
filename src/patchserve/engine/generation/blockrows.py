"""The running rows' keys and values: one preallocated :class:`KVBlock`, shared by every
request decoding together (continuous batching, see :mod:`.scheduler`)."""

from __future__ import annotations

import torch

from patchserve.models.state import KVBlock


class BlockRows:
    """One :class:`KVBlock` whose rows ``0 .. used - 1`` are the running batch, in order; the
    rows past ``used`` are spare, for prompts that join.

    A pass runs on a :meth:`view` (a narrowing of the block's tensors along the row axis:
    the pass writes its keys in place, no copy). The block grows (one copy of the used
    rows) only when a joining prompt needs more rows or slots than it has, doubling its
    rows up to ``max_rows``; rows that leave are closed up by :meth:`move` (only the rows
    past the new end are copied); once the batch is empty the block is freed.
    """

    def __init__(self, num_layers: int, max_rows: int) -> None:
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.kv = KVBlock(num_layers, 0, 0)
        self.used = 0

    def reserve(self, rows: int, slots: int) -> None:
        """Room for ``rows`` rows of ``slots`` slots each."""
        kv = self.kv
        if rows <= kv.rows and slots <= kv.slots:
            return
        new_rows = max(rows, min(2 * kv.rows, self.max_rows))
        new_slots = max(slots, kv.slots)
        for bufs in (kv.keys, kv.values):
            for i, t in enumerate(bufs):
                if t is not None:
                    grown = t.new_zeros(new_rows, t.shape[1], new_slots, t.shape[3])
                    grown[: self.used, :, : t.shape[2]] = t[: self.used]
                    bufs[i] = grown
        kv.rows, kv.slots = new_rows, new_slots

    def view(self, start: int, count: int) -> KVBlock:
        """Rows ``start .. start + count - 1`` as a block of their own (the same storage)."""

        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.narrow(0, start, count)

        kv = self.kv
        return KVBlock(
            kv.num_layers,
            count,
            kv.slots,
            [part(t) for t in kv.keys],
            [part(t) for t in kv.values],
        )

    def adopt(self, view: KVBlock, start: int) -> None:
        """After a pass on a view: the layers it allocated (the block's first pass) become
        the block's, with room for every row."""
        kv = self.kv
        for bufs, mine in ((view.keys, kv.keys), (view.values, kv.values)):
            for i, t in enumerate(bufs):
                if t is not None and mine[i] is None:
                    whole = t.new_zeros(kv.rows, t.shape[1], kv.slots, t.shape[3])
                    whole[start : start + t.shape[0]] = t
                    mine[i] = whole

    def move(self, to: list[int], source: list[int]) -> None:
        """Row ``to[i]`` takes row ``source[i]``'s keys and values (the sets are disjoint)."""
        if not to:
            return
        for bufs in (self.kv.keys, self.kv.values):
            for t in bufs:
                if t is not None:
                    dst = torch.tensor(to, device=t.device)
                    t[dst] = t[torch.tensor(source, device=t.device)]

    def release(self) -> None:
        """Free the block (the batch is empty)."""
        self.kv = KVBlock(self.num_layers, 0, 0)
        self.used = 0
