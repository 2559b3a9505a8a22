"""The sweep executor: exact activation-patching grids, computed as little as possible.

A cell patched at ``(hook, layer l, position p)`` changes nothing at layers
before ``l`` and nothing at positions before ``p``. So the corrupt run is
computed once — its residual stream entering every block, the branch
activations of the swept layers and its key/value cache — and each cell
recomputes only the lower-right block: layers from its patch point on, over
positions ``>= p``, attending to the corrupt cache for positions ``< p``
(one batch-1 cache shared by every row, never copied). Logits are computed at
the last prompt position only.

Where the cell resumes:

* ``pre_attn@l``: block ``l`` from the patched residual;
* ``post_block@l``: block ``l+1`` (its ``pre_attn`` *is* ``post_block@l``);
* ``attn_out``, ``post_attn``, ``mlp_in``, ``mlp_out@l``: inside block ``l``,
  after its (unchanged) attention, reusing the corrupt ``attn_out``;
* ``attn_head@l``: inside block ``l``, reusing the corrupt per-head outputs.

Cells are free when the patched value equals the corrupt activation bit for
bit (e.g. positions before the first differing token) or when nothing
downstream can reach the last position (a position-wise site of the last
block, ``p`` not last): both equal the corrupt baseline exactly.

Rows of one resume group are packed back to back under a token budget (no
padding in any projection or MLP), longest first so that attention padding
stays small, and under a cap on attention-score elements so that memory is
bounded by the budget, not by the grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from patchserve.cancel import cancel_scope, raise_if_cancelled
from patchserve.engine.diagnostics import identical_prompts_warning
from patchserve.engine.errors import Cancelled, InvalidArgument, SweepCancelled
from patchserve.engine.flops import suffix_flops, unembed_flops
from patchserve.engine.metrics import Grader, raw_score
from patchserve.engine.runs import CapturedRun
from patchserve.models import HookContext, Transformer, make_edit
from patchserve.models.hooks import blend
from patchserve.models.layout import ResumeRows
from patchserve.models.state import KVCache, Reuse
from patchserve.text.alignment import Alignment, align
from patchserve.wire.grids import assemble_grid
from patchserve.wire.sweep import UNALIGNED

BRANCH_HOOKS = ("attn_out", "post_attn", "mlp_in", "mlp_out")
DEFAULT_BATCH_TOKENS = 4096
SCORE_ELEMENTS_CAP = 24 * 2**20  # attention scores per batch (x4 bytes in float32)


@dataclass
class VectorSource:
    """An ablation source: one vector per ``(hook, layer)`` (``zeros`` is built in)."""

    name: str
    vector: Callable[[str, int], torch.Tensor]  # (hook, layer) -> [width]


Source = CapturedRun | VectorSource


@dataclass
class SweepSpec:
    corrupt_ids: list[int]
    hooks: list[str]
    layers: list[int]
    positions: list[int]
    source: Source | None  # None until a caller that captures the run sets it
    metric: str = "logprob"
    answer: int | None = None
    foil: int | None = None
    heads: list[int] | None = None
    alpha: float = 1.0
    masks: dict[str, torch.Tensor] | None = None  # hook -> [width] in [0, 1]
    clean_baseline: float | None = None  # m_clean for 'recovered' without clean logits
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS
    warnings: list[str] = field(default_factory=list)  # found while preparing the sweep

    @property
    def num_cells(self) -> int:
        """Cells of the grid: hooks x layers x positions, times heads for ``attn_head``."""
        per_hook = len(self.layers) * len(self.positions)
        heads = len(self.heads or [])
        return sum(per_hook * (heads if hook == "attn_head" else 1) for hook in self.hooks)


@dataclass
class Cell:
    hook: str
    layer: int
    position: int
    head: int | None
    value: float | None = None
    error: str | None = None
    skipped: str | None = None  # why the cell was not computed (its value stays None)


@dataclass
class SweepOutcome:
    hooks: list[str]
    layers: list[int]
    positions: list[int]
    heads: list[int] | None
    metric: str
    answer: int
    foil: int | None
    grids: dict[str, list[Any]]  # hook -> [layer][position] (attn_head: [layer][position][head])
    argmax: dict[str, Cell | None]  # the most restored cell of each hook (lowest for kl)
    clean: float | None  # raw metric of the clean run (logprob / logit diff for 'recovered')
    corrupt: float  # raw metric of the corrupt run (likewise)
    noise_floor: float  # in the metric's units
    skipped: list[Cell]
    alignment: Alignment | None
    corrupt_logits: torch.Tensor
    corrupt_ids: list[int] = field(default_factory=list)
    stats: dict[str, float | int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Row:
    cell: Cell
    patched: torch.Tensor


@dataclass
class _Corrupt:
    """What the corrupt forward leaves for the cells."""

    captured: dict[tuple[int, str], torch.Tensor]
    kv: KVCache
    logits: torch.Tensor  # [vocab]


def _resume_point(hook: str, layer: int) -> tuple[int, str, str | None]:
    """(start block, site the patch is written at, reused attention) for a cell."""
    if hook == "post_block":
        return layer + 1, "pre_attn", None
    if hook == "pre_attn":
        return layer, "pre_attn", None
    if hook == "attn_head":
        return layer, "attn_head", "attn_head"
    return layer, hook, "attn_out"


def _reaches_last_position(
    hook: str, layer: int, position: int, cfg_layers: int, length: int
) -> bool:
    """Whether a patch can change the last position's logits at all."""
    if position == length - 1:
        return True
    # After the last block's attention nothing mixes positions any more.
    return not (layer == cfg_layers - 1 and hook != "pre_attn")


class SweepRunner:
    """Plans and executes one sweep on one model."""

    def __init__(
        self,
        model: Transformer,
        spec: SweepSpec,
        on_cell: Callable[[Cell, int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        gate: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.model, self.spec = model, spec
        self.gate = gate if gate is not None else nullcontext
        self.cfg = model.cfg
        self.on_cell = on_cell
        self.cancel = cancel
        self.length = len(spec.corrupt_ids)
        self.done = 0
        self.total = spec.num_cells
        self.stats: dict[str, float | int] = {
            "computed": 0,
            "free": 0,
            "batches": 0,
            "flops": 0,
        }

    # -- planning -------------------------------------------------------------------

    def _capture_sites(self) -> set[tuple[int, str]]:
        spec, n = self.spec, self.cfg.num_layers
        sites: set[tuple[int, str]] = set()
        low = min(spec.layers)
        sites.update((layer, "pre_attn") for layer in range(low, n))
        for hook in spec.hooks:
            sites.update((layer, hook) for layer in spec.layers)
            if hook in BRANCH_HOOKS:
                sites.update((layer, "attn_out") for layer in spec.layers)
        return sites

    def _corrupt_forward(self) -> _Corrupt:
        ids = torch.tensor([self.spec.corrupt_ids], device=self.model.device)
        with self.gate():
            out = self.model.prefill(ids, HookContext.build(capture=self._capture_sites()))
        return _Corrupt(out.captured, out.cache, out.logits[0])

    def _source_row(
        self, hook: str, layer: int, position: int, alignment: Alignment | None
    ) -> torch.Tensor | None:
        source = self.spec.source
        if isinstance(source, VectorSource):
            return source.vector(hook, layer)
        assert alignment is not None and source is not None
        src = alignment.source_position(position)
        if src is None:
            return None
        row = source.row(hook, layer, src)
        if row is None:
            raise InvalidArgument(
                f"source run {source.name!r} has no {hook} activation at layer {layer}, "
                f"position {src}",
                "source_run",
            )
        return row

    def _grader(self, corrupt_logits: torch.Tensor) -> tuple[Grader, float | None]:
        spec, source = self.spec, self.spec.source
        clean_logits = source.last_logits if isinstance(source, CapturedRun) else None
        reference = clean_logits if clean_logits is not None else corrupt_logits
        answer = spec.answer if spec.answer is not None else int(reference.argmax())
        clean_lp = torch.log_softmax(reference.double(), dim=-1)
        clean_score = spec.clean_baseline
        if clean_logits is not None and clean_score is None:
            clean_score = float(raw_score(clean_logits[None], answer, spec.foil)[0])
        grader = Grader(
            metric=spec.metric,
            answer=answer,
            foil=spec.foil,
            clean_logprobs=clean_lp,
            clean_score=clean_score,
            corrupt_score=float(raw_score(corrupt_logits[None], answer, spec.foil)[0]),
        )
        if spec.metric == "recovered":  # clean and corrupt are reported raw (as the seed)
            return grader, clean_score
        clean_value = None
        if clean_logits is not None:
            clean_value = float(grader(clean_logits[None].to(corrupt_logits.device))[0])
        return grader, clean_value

    # -- execution ------------------------------------------------------------------

    def _emit(self, cell: Cell) -> None:
        self.done += 1
        if self.on_cell is not None:
            self.on_cell(cell, self.done, self.total)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise SweepCancelled("sweep cancelled")
        raise_if_cancelled()

    def run(self) -> SweepOutcome:
        started = time.perf_counter()
        spec = self.spec
        if spec.source is None:
            raise ValueError("spec.source is not set (prepare_sweep(source=None) leaves it to you)")
        alignment = None
        if isinstance(spec.source, CapturedRun):
            alignment = align(spec.source.token_ids, spec.corrupt_ids)
        with torch.inference_mode():
            corrupt = self._corrupt_forward()
            grader, clean_value = self._grader(corrupt.logits)
            baseline = float(grader(corrupt.logits[None])[0])
            raw_corrupt = float(raw_score(corrupt.logits[None], grader.answer, spec.foil)[0])
            reported_corrupt = raw_corrupt if spec.metric == "recovered" else baseline
            cells, groups, skipped = self._plan(corrupt, alignment, baseline)
            noise = self._execute(groups, corrupt, grader, baseline)
        grids, argmax = self._grids(cells)
        seconds = time.perf_counter() - started
        self.stats.update(
            seconds=seconds,
            cells=len(cells),
            cells_per_second=len(cells) / seconds if seconds > 0 else 0.0,
        )
        return SweepOutcome(
            hooks=spec.hooks,
            layers=spec.layers,
            positions=spec.positions,
            heads=spec.heads if "attn_head" in spec.hooks else None,
            metric=spec.metric,
            answer=grader.answer,
            foil=spec.foil,
            grids=grids,
            argmax=argmax,
            clean=clean_value,
            corrupt=reported_corrupt,
            noise_floor=noise,
            skipped=skipped,
            alignment=alignment,
            corrupt_logits=corrupt.logits.float().cpu(),
            corrupt_ids=list(spec.corrupt_ids),
            stats=dict(self.stats),
            warnings=self._warnings(),
        )

    def _warnings(self) -> list[str]:
        spec, source = self.spec, self.spec.source
        out = list(spec.warnings)
        if isinstance(source, CapturedRun):
            out += identical_prompts_warning(source.token_ids, spec.corrupt_ids)
        return out  # every cell skipped cannot happen: no alignable position is a 400

    def _plan(
        self, corrupt: _Corrupt, alignment: Alignment | None, baseline: float
    ) -> tuple[list[Cell], dict[tuple[int, str, str, str | None], list[_Row]], list[Cell]]:
        spec, n = self.spec, self.cfg.num_layers
        cells: list[Cell] = []
        groups: dict[tuple[int, str, str, str | None], list[_Row]] = {}
        skipped: list[Cell] = []
        alpha = spec.alpha
        for hook in spec.hooks:
            mask = spec.masks.get(hook) if spec.masks else None
            heads: list[int | None] = list(spec.heads or []) if hook == "attn_head" else [None]
            for layer in spec.layers:
                acts = corrupt.captured[layer, hook][0]
                for position in spec.positions:
                    source = self._source_row(hook, layer, position, alignment)
                    for head in heads:
                        cell = Cell(hook, layer, position, head)
                        cells.append(cell)
                        if source is None:
                            cell.skipped = UNALIGNED
                            skipped.append(cell)
                            self._emit(cell)
                            continue
                        dest = acts[position] if head is None else acts[position, head]
                        src = source if head is None or source.dim() == 1 else source[head]
                        weight = torch.full_like(dest, alpha, dtype=torch.float32)
                        if mask is not None:
                            weight = weight * mask.to(weight.device)
                        patched = blend(dest, src.to(dest.device), weight)
                        if torch.equal(patched, dest) or not _reaches_last_position(
                            hook, layer, position, n, self.length
                        ):
                            cell.value = baseline
                            self.stats["free"] += 1
                            self._emit(cell)
                            continue
                        start, site, reuse = _resume_point(hook, layer)
                        groups.setdefault((start, site, hook, reuse), []).append(
                            _Row(cell, patched)
                        )
        return cells, groups, skipped

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Longest rows first, packed under the token budget and the score-memory cap."""
        cfg, length = self.cfg, self.length
        budget = max(self.spec.max_batch_tokens, length)
        rows = sorted(rows, key=lambda r: r.cell.position)
        batches: list[list[_Row]] = []
        current: list[_Row] = []
        tokens = 0
        for row in rows:
            size = length - row.cell.position
            longest = length - current[0].cell.position if current else size
            scores = (len(current) + 1) * cfg.num_heads * longest * (length + longest)
            if current and (tokens + size > budget or scores > SCORE_ELEMENTS_CAP):
                batches.append(current)
                current, tokens = [], 0
            current.append(row)
            tokens += size
        if current:
            batches.append(current)
        return batches

    def _execute(
        self,
        groups: dict[tuple[int, str, str, str | None], list[_Row]],
        corrupt: _Corrupt,
        grader: Grader,
        baseline: float,
    ) -> float:
        n = self.cfg.num_layers
        noise: float | None = None
        for (start, site, hook, reuse), rows in groups.items():
            for batch in self._batches(rows):
                self._check_cancel()
                probe = noise is None and start < n
                values = self._run_batch(start, site, hook, reuse, batch, corrupt, grader, probe)
                if probe:
                    noise = abs(float(values[-1]) - baseline)
                for row, value in zip(batch, values.tolist(), strict=False):
                    row.cell.value = value
                    self._emit(row.cell)
                self.stats["computed"] += len(batch)
                self.stats["batches"] += 1
        if noise is None:
            noise = self._probe_noise(corrupt, grader, baseline)
        return noise

    def _probe_noise(self, corrupt: _Corrupt, grader: Grader, baseline: float) -> float:
        """Run one unpatched row through the sweep path (when no batch carried one)."""
        layer = min(min(self.spec.layers), self.cfg.num_layers - 1)
        cell = Cell("pre_attn", layer, self.length - 1, None)
        row = _Row(cell, corrupt.captured[layer, "pre_attn"][0, -1])
        values = self._run_batch(
            layer, "pre_attn", "pre_attn", None, [row], corrupt, grader, probe=False
        )
        return abs(float(values[0]) - baseline)

    def _run_batch(
        self,
        start: int,
        site: str,
        hook: str,
        reuse: str | None,
        batch: list[_Row],
        corrupt: _Corrupt,
        grader: Grader,
        probe: bool,
    ) -> torch.Tensor:
        """Metric values of the batch's rows (plus an unpatched probe row at the end)."""
        model, cfg, length = self.model, self.cfg, self.length
        first, patched, heads = self._batch_rows(start, site, hook, batch, corrupt, probe)
        if start == cfg.num_layers:
            # post_block of the last layer at the last position: unembed the patched residual.
            with self.gate():
                logits = model.unembed(torch.stack(patched))
            self.stats["flops"] += len(patched) * unembed_flops(cfg)
            return grader(logits)
        rows, reused = self._resume_rows(start, reuse, first, corrupt)
        edit = make_edit(
            start,
            site,
            torch.arange(len(first), device=model.device),
            rows.offsets,
            torch.stack(patched),
            heads=[h for h in heads if h is not None] if hook == "attn_head" else None,
        )
        with self.gate():
            logits = model.resume(rows, start, corrupt.kv, reused, HookContext.build([edit]))
        for p in first:
            self.stats["flops"] += suffix_flops(cfg, start, p, length, reuse)
        return grader(logits)

    def _batch_rows(
        self, start: int, site: str, hook: str, batch: list[_Row], corrupt: _Corrupt, probe: bool
    ) -> tuple[list[int], list[torch.Tensor], list[int | None]]:
        """Each row's first position, patched value and head; with ``probe``, plus an
        unpatched copy of the first row (the corrupt run through this same path)."""
        first = [r.cell.position for r in batch]
        patched = [r.patched for r in batch]
        heads = [r.cell.head for r in batch]
        if probe:
            p0 = first[0]
            if hook == "attn_head":
                own = corrupt.captured[start, "attn_head"][0, p0, heads[0]]
            elif site == "pre_attn":
                own = corrupt.captured[start, "pre_attn"][0, p0]
            else:
                own = corrupt.captured[start, hook][0, p0]
            first, patched, heads = [*first, p0], [*patched, own], [*heads, heads[0]]
        return first, patched, heads

    def _resume_rows(
        self, start: int, reuse: str | None, first: list[int], corrupt: _Corrupt
    ) -> tuple[ResumeRows, Reuse | None]:
        """The corrupt residual entering block ``start`` from each row's first position on,
        packed, and the reused attention activations at the same tokens."""
        device, length = self.model.device, self.length
        offsets = torch.tensor(first, device=device)
        index = torch.cat([torch.arange(p, length, device=device) for p in first])
        hidden = corrupt.captured[start, "pre_attn"][0].index_select(0, index)
        reused = None
        if reuse is not None:
            reused_acts = corrupt.captured[start, reuse][0].index_select(0, index)
            reused = Reuse(**{reuse: reused_acts})
        return ResumeRows.build(hidden, offsets, length - offsets), reused

    def _grids(self, cells: list[Cell]) -> tuple[dict[str, list[Any]], dict[str, Cell | None]]:
        spec = self.spec
        grids: dict[str, list[Any]] = {}
        best: dict[str, Cell | None] = {}
        for hook in spec.hooks:
            heads = spec.heads if hook == "attn_head" else None
            own = (c for c in cells if c.hook == hook)
            grids[hook], best[hook] = assemble_grid(
                own, spec.layers, spec.positions, heads, spec.metric
            )
        return grids, best


def run_sweep(
    model: Transformer,
    spec: SweepSpec,
    on_cell: Callable[[Cell, int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    gate: Callable[[], AbstractContextManager[None]] | None = None,
) -> SweepOutcome:
    """Run a sweep; ``on_cell(cell, done, total)`` fires once per cell as it is graded.

    ``cancel()`` is polled before every batch and between transformer blocks;
    ``gate()`` is entered around every model call (a server's fair scheduler).
    """
    runner = SweepRunner(model, spec, on_cell, cancel, gate)
    if cancel is None:
        return runner.run()
    with cancel_scope(cancel):  # also checked inside each forward, between blocks
        try:
            return runner.run()
        except SweepCancelled:
            raise
        except Cancelled as exc:
            raise SweepCancelled("sweep cancelled") from exc
