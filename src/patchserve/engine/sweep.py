"""The sweep executor: exact activation-patching grids, computed as little as possible.

A cell patched at ``(hook, layer l, position p)`` changes nothing at layers
before ``l`` and nothing at positions before ``p``. So the corrupt run is
computed once — its residual stream entering every block, the branch
activations of the swept layers and its key/value cache — and each cell
recomputes only the lower-right block: layers from its patch point on, over
positions ``>= p``, attending to the corrupt cache for positions ``< p``
(one batch-1 cache shared by every row, never copied). Logits are computed at
the last prompt position only — and, for a multi-token answer, at the answer's
tokens appended to every row (``engine/continuation.py``: one *lane* per tail).
An ``attn_head`` cell that is not per position patches its head at every
selected position in one row, resumed from the earliest of them.

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
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from patchserve.cancel import cancel_scope, raise_if_cancelled
from patchserve.engine.continuation import Continuation, ContinuationGrader, raw_total
from patchserve.engine.diagnostics import identical_prompts_warning
from patchserve.engine.errors import Cancelled, InvalidArgument, SweepCancelled
from patchserve.engine.flops import suffix_flops, unembed_flops
from patchserve.engine.metrics import Grader, raw_score
from patchserve.engine.runs import CapturedRun
from patchserve.models import HookContext, Transformer, make_edit
from patchserve.models.hooks import SiteEdit, blend
from patchserve.models.invariance import batch_invariant
from patchserve.models.layout import ResumeRows
from patchserve.models.state import KVCache, Reuse
from patchserve.text.alignment import Alignment, align
from patchserve.wire.grids import assemble_grid
from patchserve.wire.sweep import UNALIGNED

if TYPE_CHECKING:
    from patchserve.engine.attribution import AttributionRunner

BRANCH_HOOKS = ("attn_out", "post_attn", "mlp_in", "mlp_out")
DEFAULT_BATCH_TOKENS = 4096
SCORE_ELEMENTS_CAP = 24 * 2**20  # attention scores per batch (x4 bytes in float32)
_PROBE = "probe"  # the hook name of the unpatched row a batch carries for the noise floor

#: Metric values ``[n]`` of rows from each lane's logits ``[n, k, vocab]``.
Score = Callable[[list[torch.Tensor]], torch.Tensor]


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
    answer_ids: list[int] | None = None  # a multi-token answer (wins over answer)
    foil_ids: list[int] | None = None  # a multi-token foil (wins over foil)
    per_position: bool = True  # attn_head: False = one cell per (layer, head), all positions
    window: int = 1  # a cell restores window_layers(layer) at once (ROME's window)
    corrupt_edits: list[SiteEdit] = field(default_factory=list)  # e.g. embedding noise
    # False: no unpatched probe row (noise_floor 0.0) — a layer block of a sweep split over
    # replicas, whose first block measures the noise floor as the whole sweep would.
    probe_noise: bool = True
    method: str = "exact"  # or "attribution", "attribution+verify" (engine/attribution.py)
    verify_top_k: int = 0
    # Compute only these (hook, layer, position, head) cells, in batches of their own: bit
    # for bit the full sweep's values (the sweep's passes are batch-invariant).
    only: set[tuple[str, int, int | None, int | None]] | None = None

    @property
    def num_cells(self) -> int:
        """Cells of the grid: hooks x layers x positions, times heads for ``attn_head``
        (layers x heads when not ``per_position``)."""
        per_hook = len(self.layers) * len(self.positions)
        heads = len(self.heads or [])
        if not self.per_position:
            by_head = len(self.layers) * heads
            return sum(by_head if h == "attn_head" else per_hook for h in self.hooks)
        return sum(per_hook * (heads if hook == "attn_head" else 1) for hook in self.hooks)


@dataclass
class Cell:
    hook: str
    layer: int
    position: int | None  # None: a head patched at every selected position at once
    head: int | None
    value: float | None = None
    error: str | None = None
    skipped: str | None = None  # why the cell was not computed (its value stays None)
    stderr: float | None = None  # standard error of value over noise samples
    kind: str = "exact"  # or "estimate" (method "attribution")


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
    answer_ids: list[int] = field(default_factory=list)
    foil_ids: list[int] | None = None
    per_position: bool = True
    stderr: dict[str, list[Any]] | None = None  # noise: standard error of each cell's mean
    corrupt_stderr: float | None = None  # noise: of the corrupt baseline's mean
    method: str = "exact"
    kinds: dict[str, list[Any]] | None = None  # hook -> grid of "exact" / "estimate" (attribution)


@dataclass
class _Row:
    cell: Cell
    patched: torch.Tensor  # [P, ...]: the values written at ``positions``
    positions: list[int]  # ascending; one unless a head is patched at every position
    extra: list[_Row | None] = field(default_factory=list)  # a window's further layers

    @property
    def offset(self) -> int:
        return self.positions[0]


_GroupKey = tuple[int, str, str, str | None, tuple[int, ...]]  # start, site, hook, reuse, window


def window_layers(layer: int, window: int, num_layers: int) -> list[int]:
    """The layers a cell at ``layer`` restores: ROME's ``max(0, l - w//2) .. min(L, l - (-w//2))``
    (exclusive), i.e. ``l - w//2 .. l + (w-1)//2`` clipped to the model."""
    return list(range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2))))


@dataclass
class _Corrupt:
    """What the corrupt forward of one lane (the prompt plus a tail) leaves for the cells."""

    captured: dict[tuple[int, str], torch.Tensor]
    kv: KVCache
    logits: torch.Tensor  # [k, vocab] at the read positions (last prompt token, the tail)
    final: torch.Tensor  # [tokens, d] residual leaving the last block
    length: int  # prompt + tail tokens

    @property
    def reads(self) -> int:
        return self.logits.shape[0]


def cell_key(cell: Cell) -> tuple[str, int, int | None, int | None]:
    return (cell.hook, cell.layer, cell.position, cell.head)


def _resume_point(hook: str, layer: int) -> tuple[int, str, str | None]:
    """(start block, site the patch is written at, reused attention) for a cell."""
    if hook == "post_block":
        return layer + 1, "pre_attn", None
    if hook == "pre_attn":
        return layer, "pre_attn", None
    if hook == "attn_head":
        return layer, "attn_head", "attn_head"
    return layer, hook, "attn_out"


def _head_of(source: torch.Tensor, head: int | None) -> torch.Tensor:
    """The row a cell writes: one head's slice of an ``attn_head`` source ``[heads, d]``."""
    return source if head is None or source.dim() == 1 else source[head]


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
        self.continuation = Continuation.plan([0], None)  # set by run()
        self.lane_lengths = [self.length]
        self.unpatched_positions: set[int] = set()
        self.done = 0
        self.total = spec.num_cells
        self.free: list[Cell] = []
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
        layers = {w for layer in spec.layers for w in window_layers(layer, spec.window, n)}
        sites.update((layer, "pre_attn") for layer in range(min(layers), n))
        for hook in spec.hooks:
            sites.update((layer, hook) for layer in layers)
            if hook in BRANCH_HOOKS:
                sites.update((layer, "attn_out") for layer in layers)
        return sites

    def _corrupt_forward(self) -> _Corrupt:
        """The corrupt prompt once: captures, key/value cache, last-position logits."""
        ids = torch.tensor([self.spec.corrupt_ids], device=self.model.device)
        with self.gate():
            hooks = HookContext.build(self.spec.corrupt_edits, capture=self._capture_sites())
            out = self.model.prefill(ids, hooks)
        return _Corrupt(out.captured, out.cache, out.logits, out.hidden[0], ids.shape[1])

    def _lane_forward(self, base: _Corrupt, tail: list[int]) -> _Corrupt:
        """The corrupt run with ``tail`` appended: the tail alone on the prompt's cache, so
        the prompt's activations stay bit for bit those of the prompt's own forward (cells
        they leave unchanged stay free). Resumed rows attend to the cache of the prompt
        only (positions before their first patch); the tail's own keys are recomputed."""
        if not tail:
            return base
        ids = torch.tensor([tail], device=self.model.device)
        with self.gate():
            out = self.model.extend(ids, base.kv, HookContext.build(capture=self._capture_sites()))
            tail_logits = self.model.unembed(out.hidden[0])
        captured = {k: torch.cat([v, out.captured[k]], dim=1) for k, v in base.captured.items()}
        logits = torch.cat([base.logits, tail_logits])
        final = torch.cat([base.final, out.hidden[0]])
        return _Corrupt(captured, base.kv, logits, final, base.length + len(tail))

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

    def _answer(self, corrupt_logits: torch.Tensor) -> list[int]:
        """The graded answer: given, else the clean run's top-1 (the corrupt run's without)."""
        spec, source = self.spec, self.spec.source
        if spec.answer_ids is not None:
            return list(spec.answer_ids)
        if spec.answer is not None:
            return [spec.answer]
        clean_logits = source.last_logits if isinstance(source, CapturedRun) else None
        if clean_logits is None:
            clean_logits = corrupt_logits
        return [int(clean_logits.argmax())]

    def _grader(self, corrupt: list[_Corrupt]) -> tuple[Score, float | None, float]:
        """The scorer of lane logits, the clean value and the raw corrupt ``m``."""
        if self.continuation.multi:
            return self._continuation_grader(corrupt)
        grader, clean_value = self.token_grader(corrupt[0].logits[0], self.continuation.answer[0])
        score: Score = lambda lanes: grader(lanes[0][:, 0])
        assert grader.corrupt_score is not None
        return score, clean_value, grader.corrupt_score

    def token_grader(
        self, corrupt_logits: torch.Tensor, answer: int
    ) -> tuple[Grader, float | None]:
        """The grader of a one-token answer given the corrupt run's last logits, and the clean
        value (raw ``m`` for ``recovered``, as the seed reports it; graded otherwise)."""
        spec, source = self.spec, self.spec.source
        clean_logits = source.last_logits if isinstance(source, CapturedRun) else None
        reference = clean_logits if clean_logits is not None else corrupt_logits
        clean_lp = torch.log_softmax(reference.double(), dim=-1)
        clean_score = spec.clean_baseline
        if clean_logits is not None and clean_score is None:
            clean_score = float(raw_score(clean_logits[None], answer, spec.foil)[0])
        raw_corrupt = float(raw_score(corrupt_logits[None], answer, spec.foil)[0])
        grader = Grader(spec.metric, answer, spec.foil, clean_score, raw_corrupt, clean_lp)
        if spec.metric == "recovered":  # clean and corrupt are reported raw (as the seed)
            return grader, clean_score
        if clean_logits is None:
            return grader, None
        return grader, float(grader(clean_logits[None].to(corrupt_logits.device))[0])

    def _continuation_grader(self, corrupt: list[_Corrupt]) -> tuple[Score, float | None, float]:
        """Totals of a multi-token answer; the clean run's lanes are one forward each."""
        spec, source, cont = self.spec, self.spec.source, self.continuation
        clean = None
        if isinstance(source, CapturedRun):
            clean = [self._clean_lane(source.token_ids, tail) for tail in cont.tails]
        clean_score = spec.clean_baseline
        if clean is not None and clean_score is None:
            clean_score = float(raw_total(cont, clean)[0])
        raw_corrupt = float(raw_total(cont, [c.logits[None] for c in corrupt])[0])
        foil = None if cont.foil is None else cont.foil[0]
        grading = Grader(spec.metric, cont.answer[0], foil, clean_score, raw_corrupt)
        grader = ContinuationGrader(grading, cont)
        if spec.metric == "recovered" or clean is None:
            return grader, clean_score if spec.metric == "recovered" else None, raw_corrupt
        return grader, float(grader(clean)[0]), raw_corrupt

    def _clean_lane(self, clean_ids: list[int], tail: list[int]) -> torch.Tensor:
        """Logits ``[1, k, vocab]`` of the clean prompt plus ``tail`` at the read positions."""
        ids = torch.tensor([clean_ids + tail], device=self.model.device)
        with self.gate():
            logits: torch.Tensor = self.model(ids)
        return logits[:, len(clean_ids) - 1 :]

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
            base = self._corrupt_forward()
            foil = spec.foil_ids or (None if spec.foil is None else [spec.foil])
            self.continuation = Continuation.plan(self._answer(base.logits[0]), foil)
            corrupt = [self._lane_forward(base, tail) for tail in self.continuation.tails]
            del base
            score, clean_value, raw_corrupt = self._grader(corrupt)
            baseline = float(score([c.logits[None] for c in corrupt])[0])
            reported_corrupt = raw_corrupt if spec.metric == "recovered" else baseline
            cells, groups, skipped = self._plan(corrupt[0], alignment, baseline)
            noise = self._execute(groups, corrupt, score, baseline)
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
            answer=self.continuation.answer[0],
            foil=spec.foil,
            grids=grids,
            argmax=argmax,
            clean=clean_value,
            corrupt=reported_corrupt,
            noise_floor=noise,
            skipped=skipped,
            alignment=alignment,
            corrupt_logits=corrupt[0].logits[0].float().cpu(),
            corrupt_ids=list(spec.corrupt_ids),
            stats=dict(self.stats),
            warnings=self._warnings(),
            answer_ids=list(self.continuation.answer),
            foil_ids=self.continuation.foil,
            per_position=spec.per_position,
        )

    def _warnings(self) -> list[str]:
        spec, source = self.spec, self.spec.source
        out = list(spec.warnings)
        if isinstance(source, CapturedRun) and not spec.corrupt_edits:
            out += identical_prompts_warning(source.token_ids, spec.corrupt_ids)
        if self.unpatched_positions:
            out.append(
                "attn_head cells with per_position false patch every selected position that "
                "has a clean partner; positions "
                f"{sorted(self.unpatched_positions)} have none and were left unpatched"
            )
        return out  # every cell skipped cannot happen: no alignable position is a 400

    def _plan(
        self, corrupt: _Corrupt, alignment: Alignment | None, baseline: float
    ) -> tuple[list[Cell], dict[_GroupKey, list[_Row]], list[Cell]]:
        cells: list[Cell] = []
        groups: dict[_GroupKey, list[_Row]] = {}
        skipped: list[Cell] = []
        own = self.spec.only  # plan these cells alone
        for hook in self.spec.hooks:
            for layer in self.spec.layers:
                window = window_layers(layer, self.spec.window, self.cfg.num_layers)
                targets = [list(self._targets(hook, w, alignment)) for w in window]
                for i, (cell, _) in enumerate(targets[window.index(layer)]):
                    if own is not None and cell_key(cell) not in own:
                        continue
                    cells.append(cell)
                    entries = [per_layer[i][1] for per_layer in targets]
                    if not all(entries):
                        cell.skipped = UNALIGNED
                        skipped.append(cell)
                        self._emit_planned(cell)
                        continue
                    rows = [
                        self._row(replace(cell, layer=w), e, corrupt)
                        for w, e in zip(window, entries, strict=True)
                    ]
                    low = next((k for k, row in enumerate(rows) if row is not None), None)
                    if low is None:
                        cell.value = baseline
                        self.stats["free"] += 1
                        self.free.append(cell)
                        self._emit_planned(cell)
                        continue
                    row = rows[low]
                    assert row is not None
                    row.cell, row.extra = cell, rows[low + 1 :]
                    start, site, reuse = _resume_point(hook, window[low])
                    key = (start, site, hook, reuse, tuple(window[low + 1 :]))
                    groups.setdefault(key, []).append(row)
        return cells, groups, skipped

    def _targets(
        self, hook: str, layer: int, alignment: Alignment | None
    ) -> Iterator[tuple[Cell, list[tuple[int, torch.Tensor]]]]:
        """The cells of one (hook, layer) and the (position, source) pairs each patches."""
        spec = self.spec
        sources = [(p, self._source_row(hook, layer, p, alignment)) for p in spec.positions]
        if hook == "attn_head" and not spec.per_position:
            aligned = [(p, s) for p, s in sources if s is not None]
            self.unpatched_positions.update(p for p, s in sources if s is None)
            for h in spec.heads or []:
                yield Cell(hook, layer, None, h), [(p, _head_of(s, h)) for p, s in aligned]
            return
        heads: list[int | None] = list(spec.heads or []) if hook == "attn_head" else [None]
        for at, source in sources:
            for head in heads:
                entries = [] if source is None else [(at, _head_of(source, head))]
                yield Cell(hook, layer, at, head), entries

    def _row(
        self, cell: Cell, entries: list[tuple[int, torch.Tensor]], corrupt: _Corrupt
    ) -> _Row | None:
        """The patched values of a cell, or None when it is free (equals the baseline)."""
        spec, hook = self.spec, cell.hook
        mask = spec.masks.get(hook) if spec.masks else None
        acts = corrupt.captured[cell.layer, hook][0]
        entries = sorted(entries, key=lambda e: e[0])
        positions = [p for p, _ in entries]
        index = torch.tensor(positions, device=acts.device)
        dest = acts[index] if cell.head is None else acts[index, cell.head]
        src = torch.stack([s.to(dest.device) for _, s in entries])
        weight = torch.full_like(dest, spec.alpha, dtype=torch.float32)
        if mask is not None:
            weight = weight * mask.to(weight.device)
        patched = blend(dest, src, weight)
        n = self.cfg.num_layers
        length = self.length
        reaches = any(_reaches_last_position(hook, cell.layer, p, n, length) for p in positions)
        if torch.equal(patched, dest) or not reaches:
            return None
        return _Row(cell, patched, positions)

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        """Longest rows first, packed under the token budget and the score-memory cap."""
        cfg, lanes = self.cfg, self.lane_lengths
        length = max(lanes)
        budget = max(self.spec.max_batch_tokens, length * len(lanes))
        rows = sorted(rows, key=lambda r: r.offset)
        batches: list[list[_Row]] = []
        current: list[_Row] = []
        tokens = 0
        # attention sees every row at all ``length`` slots (batch-invariant geometry):
        # written-out scores (soft-capped models) hold length x length per head, flash
        # attention's working set length x head_dim
        per_slot = length if cfg.attn_softcap is not None else cfg.head_dim
        for row in rows:
            size = sum(lane - row.offset for lane in lanes)
            scores = (len(current) + 1) * len(lanes) * cfg.num_heads * length * per_slot
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
        groups: dict[_GroupKey, list[_Row]],
        corrupt: list[_Corrupt],
        score: Score,
        baseline: float,
    ) -> float:
        n = self.cfg.num_layers
        self.lane_lengths = [lane.length for lane in corrupt]
        noise: float | None = None
        plan = [(key, batch) for key, rows in groups.items() for batch in self._batches(rows)]
        self._report_free_wanted(plan)
        probed = False
        for (start, site, _, reuse, extra), batch in plan:
            probe = not probed and start < n and self.spec.probe_noise
            probed = probed or probe
            self._check_cancel()
            if probe:
                # an unpatched copy of the first row: the corrupt run, resumed
                batch = [*batch, self._unpatched(batch[0], start, site, corrupt[0])]
            lane_logits = [
                self._run_lane(start, site, reuse, batch, lane, extra) for lane in corrupt
            ]
            values = score(lane_logits)
            if batch[-1].cell.hook == _PROBE:
                noise = abs(float(values[-1]) - baseline)
                batch = batch[:-1]
            for row, value in zip(batch, values.tolist(), strict=False):
                row.cell.value = value
                self._emit(row.cell)
            self.stats["computed"] += len(batch)
            self.stats["batches"] += 1
        if noise is None:
            noise = self._probe_noise(corrupt, score, baseline) if self.spec.probe_noise else 0.0
        return noise

    def _unpatched(self, row: _Row, start: int, site: str, corrupt: _Corrupt) -> _Row:
        """A copy of ``row`` writing the corrupt run's own values: the corrupt run, resumed."""
        cell, index = row.cell, torch.tensor(row.positions, device=self.model.device_of(start))
        if cell.hook == "attn_head":
            own = corrupt.captured[start, "attn_head"][0, index, cell.head]
        elif site == "pre_attn":
            own = corrupt.captured[start, "pre_attn"][0, index]
        else:
            own = corrupt.captured[start, cell.hook][0, index]
        probe = Cell(_PROBE, cell.layer, cell.position, cell.head)
        return _Row(probe, own, row.positions)

    def _report_free_wanted(self, plan: list[tuple[_GroupKey, list[_Row]]]) -> None:
        """With ``spec.only`` (planned alone): the total, known at last, and the free cells."""
        if self.spec.only is None:
            return
        self.total = len(self.free) + sum(len(batch) for _, batch in plan)
        for cell in self.free:
            self._emit(cell)

    def _emit_planned(self, cell: Cell) -> None:
        """Report a cell settled while planning (skipped or free) — with ``spec.only``, later,
        once the total is known (:meth:`_report_free_wanted`)."""
        if self.spec.only is None:
            self._emit(cell)

    def _probe_noise(self, corrupt: list[_Corrupt], score: Score, baseline: float) -> float:
        """Run one unpatched row through the sweep path (when no batch carried one)."""
        layer = min(min(self.spec.layers), self.cfg.num_layers - 1)
        last = self.length - 1
        cell = Cell("pre_attn", layer, last, None)
        row = _Row(cell, corrupt[0].captured[layer, "pre_attn"][0, last : last + 1], [last])
        lane_logits = [self._run_lane(layer, "pre_attn", None, [row], lane) for lane in corrupt]
        return abs(float(score(lane_logits)[0]) - baseline)

    def _edit(
        self, start: int, site: str, rows: list[_Row], index: list[int] | None = None
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

    def _window_edits(self, rows: list[_Row], extra: tuple[int, ...]) -> list[SiteEdit]:
        """The patches of a window's layers above its first, on the rows that change them."""
        edits = []
        for i, layer in enumerate(extra):
            chosen = [(j, r.extra[i]) for j, r in enumerate(rows) if i < len(r.extra)]
            index = [j for j, row in chosen if row is not None]
            if index:
                own = [row for _, row in chosen if row is not None]
                edits.append(self._edit(layer, own[0].cell.hook, own, index))
        return edits

    def _run_lane(
        self,
        start: int,
        site: str,
        reuse: str | None,
        rows: list[_Row],
        lane: _Corrupt,
        extra: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """Logits ``[rows, k, vocab]`` of one lane at its read positions, rows patched."""
        model, cfg = self.model, self.cfg
        k = lane.reads
        if start == cfg.num_layers:
            # post_block of the last layer at the last position: unembed the patched residual.
            with self.gate(), batch_invariant():
                logits = model.unembed(torch.cat([r.patched for r in rows]))[:, None]
            self.stats["flops"] += len(rows) * unembed_flops(cfg)
            tail = lane.logits[1:][None].expand(len(rows), -1, -1)  # the tail is unchanged
            return logits if k == 1 else torch.cat([logits, tail.to(logits.dtype)], dim=1)
        resumed, reused = self._resume_rows(start, reuse, rows, lane)
        hooks = HookContext.build([self._edit(start, site, rows), *self._window_edits(rows, extra)])
        # batch-invariant: a cell's value does not depend on the cells batched with it
        with self.gate(), batch_invariant():
            if k == 1:
                logits = model.resume(resumed, start, lane.kv, reused, hooks, invariant=True)
                logits = logits[:, None]
            else:  # the last k tokens of every packed row: the last prompt one, the tail
                x = model.run_blocks(resumed, start, lane.kv, reused, hooks, invariant=True)
                ends = torch.cumsum(resumed.lengths, 0)
                ends = ends.to(x.device)
                logits = model.unembed(x[(ends - k)[:, None] + torch.arange(k, device=x.device)])
        for r in rows:
            self.stats["flops"] += suffix_flops(cfg, start, r.offset, lane.length, reuse)
        return logits

    def _resume_rows(
        self, start: int, reuse: str | None, rows: list[_Row], lane: _Corrupt
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

    def _grids(self, cells: list[Cell]) -> tuple[dict[str, list[Any]], dict[str, Cell | None]]:
        return assemble_grids(self.spec, cells)


def assemble_grids(
    spec: SweepSpec, cells: list[Cell]
) -> tuple[dict[str, list[Any]], dict[str, Cell | None]]:
    """Each hook's grid and most restored cell, from the cells in planning order."""
    grids: dict[str, list[Any]] = {}
    best: dict[str, Cell | None] = {}
    for hook in spec.hooks:
        heads = spec.heads if hook == "attn_head" else None
        own = (c for c in cells if c.hook == hook)
        grids[hook], best[hook] = assemble_grid(
            own, spec.layers, spec.positions, heads, spec.metric, spec.per_position
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
    runner: SweepRunner | AttributionRunner
    if spec.method == "exact":
        runner = SweepRunner(model, spec, on_cell, cancel, gate)
    else:
        from patchserve.engine.attribution import AttributionRunner

        runner = AttributionRunner(model, spec, on_cell, cancel, gate)
    if cancel is None:
        return runner.run()
    with cancel_scope(cancel):  # also checked inside each forward, between blocks
        try:
            return runner.run()
        except SweepCancelled:
            raise
        except Cancelled as exc:
            raise SweepCancelled("sweep cancelled") from exc
