"""The sweep executor: one batch of patched rows → logits, on the runtime.

Each row recomputes only the lower-right block of the corrupt run: layers from
its resume point on, over positions ``>=`` its offset, attending to the
corrupt cache for earlier positions (one batch-1 cache shared by every row,
never copied). Rows are packed back to back (no padding in any projection or
MLP). Logits are read at the last prompt position and, for a multi-token
answer, at the lane's tail. A cell that resumes after the last block (a
``post_block`` of the last layer at the last position) is only unembedded.
Every pass is batch-invariant: a cell's value does not depend on the cells
batched with it.
"""

from __future__ import annotations

import torch

from patchserve.engine.flops import suffix_flops, unembed_flops
from patchserve.engine.sweep_lanes import CorruptLane, Gate
from patchserve.engine.sweep_plan import ResumeKey
from patchserve.engine.sweep_rows import Row
from patchserve.models import HookContext, Transformer, make_edit
from patchserve.models.hooks import SiteEdit
from patchserve.models.invariance import batch_invariant, plain_unembedding, sweeps_invariant
from patchserve.models.layout import ResumeRows
from patchserve.models.state import Reuse


class SweepExecutor:
    """Runs batches of rows on one model; counts their FLOPs in ``stats["flops"]``."""

    def __init__(self, model: Transformer, gate: Gate, stats: dict[str, float | int]) -> None:
        self.model, self.gate, self.stats = model, gate, stats
        self.cfg = model.cfg

    def run(self, key: ResumeKey, rows: list[Row], lanes: list[CorruptLane]) -> list[torch.Tensor]:
        """Logits ``[rows, k, vocab]`` of every lane at its read positions, rows patched."""
        return [self._run_lane(key, rows, lane) for lane in lanes]

    def _run_lane(self, key: ResumeKey, rows: list[Row], lane: CorruptLane) -> torch.Tensor:
        model, cfg = self.model, self.cfg
        start, site, reuse = key.start, key.site, key.reuse
        k = lane.reads
        invariant = sweeps_invariant()  # always, but in a bench's invariant=False comparison
        passes = batch_invariant if invariant else plain_unembedding
        if start == cfg.num_layers:
            # post_block of the last layer at the last position: unembed the patched residual.
            with self.gate(), passes():
                logits = model.unembed(torch.cat([r.patched for r in rows]))[:, None]
            self.stats["flops"] += len(rows) * unembed_flops(cfg)
            tail = lane.logits[1:][None].expand(len(rows), -1, -1)  # the tail is unchanged
            return logits if k == 1 else torch.cat([logits, tail.to(logits.dtype)], dim=1)
        resumed, reused = self._resume_rows(start, reuse, rows, lane)
        edits = [self._edit(start, site, rows), *self._window_edits(rows, key.extra)]
        hooks = HookContext.build(edits)
        # batch-invariant: a cell's value does not depend on the cells batched with it
        with self.gate(), passes():
            if k == 1:
                logits = model.resume(resumed, start, lane.kv, reused, hooks, invariant)
                logits = logits[:, None]
            else:  # the last k tokens of every packed row: the last prompt one, the tail
                x = model.run_blocks(resumed, start, lane.kv, reused, hooks, invariant)
                ends = torch.cumsum(resumed.lengths, 0)
                ends = ends.to(x.device)
                logits = model.unembed(x[(ends - k)[:, None] + torch.arange(k, device=x.device)])
        for r in rows:
            self.stats["flops"] += suffix_flops(cfg, start, r.offset, lane.length, reuse)
        return logits

    def _edit(
        self, start: int, site: str, rows: list[Row], index: list[int] | None = None
    ) -> SiteEdit:
        """One edit entry per patched position of every row (batch rows ``index``: default
        ``0..len(rows)-1``)."""
        device = self.model.device_of(start)  # the edited layer's (a device map)
        counts = torch.tensor([len(r.positions) for r in rows], device=device)
        batch_rows = torch.tensor(index if index is not None else range(len(rows)), device=device)
        entry_rows = torch.repeat_interleave(batch_rows, counts)
        positions = [p for r in rows for p in r.positions]
        heads = [r.cell.head for r in rows for _ in r.positions]
        attn_head = rows[0].cell.head is not None
        return make_edit(
            start,
            site,
            entry_rows,
            positions,
            torch.cat([r.patched for r in rows]),
            heads=[h for h in heads if h is not None] if attn_head else None,
        )

    def _window_edits(self, rows: list[Row], extra: tuple[int, ...]) -> list[SiteEdit]:
        """The patches of a window's layers above its first, on the rows that change them."""
        edits = []
        for i, layer in enumerate(extra):
            chosen = [(j, r.extra[i]) for j, r in enumerate(rows) if i < len(r.extra)]
            index = [j for j, row in chosen if row is not None]
            if index:
                own = [row for _, row in chosen if row is not None]
                edits.append(self._edit(layer, own[0].cell.hook, own, index))
        return edits

    def _resume_rows(
        self, start: int, reuse: str | None, rows: list[Row], lane: CorruptLane
    ) -> tuple[ResumeRows, Reuse | None]:
        """The lane's corrupt residual entering block ``start`` from each row's first
        position on, packed, and the reused attention activations at the same tokens."""
        device, length = self.model.device_of(start), lane.length
        offsets = torch.tensor([r.offset for r in rows], device=device)
        index = torch.cat([torch.arange(r.offset, length, device=device) for r in rows])
        hidden = lane.captured[start, "pre_attn"][0].index_select(0, index)
        reused = None
        if reuse is not None:
            reused = Reuse(**{reuse: lane.captured[start, reuse][0].index_select(0, index)})
        return ResumeRows.build(hidden, offsets, length - offsets), reused
