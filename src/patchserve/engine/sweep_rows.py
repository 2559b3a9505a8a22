"""A sweep's cells and the patched rows that compute them.

Every cell of the grid gets the values it writes (source row, ``alpha``, mask,
blended into the corrupt activation) at the positions it patches. A cell is
*free* when the patched value equals the corrupt activation bit for bit (e.g.
positions before the first differing token) or when nothing downstream can
reach the last position (a position-wise site of the last block, ``p`` not
last): both equal the corrupt baseline exactly. A cell without a clean partner
position is skipped. A window cell carries the rows of its further layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from patchserve.engine.errors import InvalidArgument
from patchserve.engine.sweep import Cell, SweepSpec, VectorSource, cell_key, window_layers
from patchserve.engine.sweep_lanes import CorruptLane
from patchserve.engine.sweep_plan import ResumeKey, reaches_last_position, resume_point
from patchserve.models.hooks import blend
from patchserve.text.alignment import Alignment
from patchserve.wire.sweep import UNALIGNED

PROBE = "probe"  # the hook name of the unpatched row a batch carries for the noise floor


@dataclass
class Row:
    cell: Cell
    patched: torch.Tensor  # [P, ...]: the values written at ``positions``
    positions: list[int]  # ascending; one unless a head is patched at every position
    extra: list[Row | None] = field(default_factory=list)  # a window's further layers

    @property
    def offset(self) -> int:
        return self.positions[0]


@dataclass
class PlannedCells:
    cells: list[Cell] = field(default_factory=list)  # every planned cell, in grid order
    rows: list[tuple[ResumeKey, Row]] = field(default_factory=list)  # the cells to compute
    skipped: list[Cell] = field(default_factory=list)
    free: list[Cell] = field(default_factory=list)
    unpatched_positions: set[int] = field(default_factory=set)  # attn_head, all positions


def source_row(
    spec: SweepSpec, hook: str, layer: int, position: int, alignment: Alignment | None
) -> torch.Tensor | None:
    """The source value of ``(hook, layer)`` for corrupt ``position`` (None: unaligned)."""
    source = spec.source
    if isinstance(source, VectorSource):
        return source.vector(hook, layer)
    assert alignment is not None and source is not None
    src = alignment.source_position(position)
    if src is None:
        return None
    row = source.row(hook, layer, src)
    if row is None:
        raise InvalidArgument(
            f"source run {source.name!r} has no {hook} activation at layer {layer}, position {src}",
            "source_run",
        )
    return row


def _head_of(source: torch.Tensor, head: int | None) -> torch.Tensor:
    """The row a cell writes: one head's slice of an ``attn_head`` source ``[heads, d]``."""
    return source if head is None or source.dim() == 1 else source[head]


class CellRows:
    """Plans the cells of one sweep into patched rows; ``settle(cell)`` hears each cell
    settled while planning (skipped or free), in order."""

    def __init__(
        self,
        spec: SweepSpec,
        num_layers: int,
        corrupt: CorruptLane,
        alignment: Alignment | None,
        settle: Callable[[Cell], None],
    ) -> None:
        self.spec, self.num_layers, self.corrupt = spec, num_layers, corrupt
        self.alignment, self.settle = alignment, settle
        self.length = len(spec.corrupt_ids)

    def plan(self, baseline: float) -> PlannedCells:
        spec, out = self.spec, PlannedCells()
        own = spec.only  # plan these cells alone
        for hook in spec.hooks:
            for layer in spec.layers:
                window = window_layers(layer, spec.window, self.num_layers)
                targets = [list(self._targets(hook, w, out)) for w in window]
                for i, (cell, _) in enumerate(targets[window.index(layer)]):
                    if own is not None and cell_key(cell) not in own:
                        continue
                    out.cells.append(cell)
                    entries = [per_layer[i][1] for per_layer in targets]
                    if not all(entries):
                        cell.skipped = UNALIGNED
                        out.skipped.append(cell)
                        self.settle(cell)
                        continue
                    rows = [
                        self._row(replace(cell, layer=w), e)
                        for w, e in zip(window, entries, strict=True)
                    ]
                    low = next((k for k, row in enumerate(rows) if row is not None), None)
                    if low is None:
                        cell.value = baseline
                        out.free.append(cell)
                        self.settle(cell)
                        continue
                    row = rows[low]
                    assert row is not None
                    row.cell, row.extra = cell, rows[low + 1 :]
                    start, site, reuse = resume_point(hook, window[low])
                    key = ResumeKey(start, site, hook, reuse, tuple(window[low + 1 :]))
                    out.rows.append((key, row))
        return out

    def _targets(
        self, hook: str, layer: int, out: PlannedCells
    ) -> Iterator[tuple[Cell, list[tuple[int, torch.Tensor]]]]:
        """The cells of one (hook, layer) and the (position, source) pairs each patches."""
        spec, alignment = self.spec, self.alignment
        sources = [(p, source_row(spec, hook, layer, p, alignment)) for p in spec.positions]
        if hook == "attn_head" and not spec.per_position:
            aligned = [(p, s) for p, s in sources if s is not None]
            out.unpatched_positions.update(p for p, s in sources if s is None)
            for h in spec.heads or []:
                yield Cell(hook, layer, None, h), [(p, _head_of(s, h)) for p, s in aligned]
            return
        heads: list[int | None] = list(spec.heads or []) if hook == "attn_head" else [None]
        for at, source in sources:
            for head in heads:
                entries = [] if source is None else [(at, _head_of(source, head))]
                yield Cell(hook, layer, at, head), entries

    def _row(self, cell: Cell, entries: list[tuple[int, torch.Tensor]]) -> Row | None:
        """The patched values of a cell, or None when it is free (equals the baseline)."""
        spec, hook = self.spec, cell.hook
        mask = spec.masks.get(hook) if spec.masks else None
        acts = self.corrupt.captured[cell.layer, hook][0]
        entries = sorted(entries, key=lambda e: e[0])
        positions = [p for p, _ in entries]
        index = torch.tensor(positions, device=acts.device)
        dest = acts[index] if cell.head is None else acts[index, cell.head]
        src = torch.stack([s.to(dest.device) for _, s in entries])
        weight = torch.full_like(dest, spec.alpha, dtype=torch.float32)
        if mask is not None:
            weight = weight * mask.to(weight.device)
        patched = blend(dest, src, weight)
        n, length = self.num_layers, self.length
        reaches = any(reaches_last_position(hook, cell.layer, p, n, length) for p in positions)
        if torch.equal(patched, dest) or not reaches:
            return None
        return Row(cell, patched, positions)


def unpatched_row(row: Row, key: ResumeKey, corrupt: CorruptLane, device: torch.device) -> Row:
    """A copy of ``row`` writing the corrupt run's own values: the corrupt run, resumed."""
    cell, index = row.cell, torch.tensor(row.positions, device=device)
    start = key.start
    if cell.hook == "attn_head":
        own = corrupt.captured[start, "attn_head"][0, index, cell.head]
    elif key.site == "pre_attn":
        own = corrupt.captured[start, "pre_attn"][0, index]
    else:
        own = corrupt.captured[start, cell.hook][0, index]
    probe = Cell(PROBE, cell.layer, cell.position, cell.head)
    return Row(probe, own, row.positions)


def probe_row(spec: SweepSpec, num_layers: int, corrupt: CorruptLane) -> tuple[ResumeKey, Row]:
    """One unpatched row of the sweep path (when no batch carried one)."""
    layer = min(min(spec.layers), num_layers - 1)
    last = len(spec.corrupt_ids) - 1
    cell = Cell("pre_attn", layer, last, None)
    row = Row(cell, corrupt.captured[layer, "pre_attn"][0, last : last + 1], [last])
    return ResumeKey(layer, "pre_attn", "pre_attn", None, ()), row
