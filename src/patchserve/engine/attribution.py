"""Attribution patching: a first-order estimate of every cell of a sweep, optionally verified.

``method="attribution"`` estimates each cell from one corrupt forward and one
backward (the clean side is the captured source run): with ``q`` the metric's
raw quantity at the last position — log p(answer) (``logprob``, ``prob``,
``recovered`` without a foil), the logit difference (``logit_diff``,
``recovered`` with a foil) or KL(clean ‖ run) (``kl``) — and ``a`` the corrupt
activation at the cell's site,

    q_cell ≈ q_corrupt + (patched − a) · ∂q/∂a          (at the corrupt run)

where ``patched`` is exactly the value an exact cell writes (source row,
``alpha``, mask). The estimate is then graded like an exact cell
(``prob = exp(q)``, ``recovered`` normalised by the clean and corrupt
baselines). For ``kl`` this is the first-order term of KL(clean ‖ ·) around
the corrupt run; its gradient does not vanish there. ``∂q/∂a`` is the *total*
derivative at the site (every downstream path, through later positions and
layers), taken on the optimised runtime with a zero tensor added at each swept
site so that autograd sees it.

``method="attribution+verify"`` ranks the aligned cells by the magnitude of
their estimated change ``|value − value_corrupt|`` and recomputes the top
``verify_top_k`` with the exact sweep engine, in batches of their own; the
sweep's passes are batch-invariant (:mod:`patchserve.models.invariance`), so
their values equal the full exact sweep's bit for bit. Cells
stream as estimates first, then as exact values as they land; each cell is
marked ``kind="exact"`` or ``"estimate"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, get_args

import numpy as np
import torch

from patchserve.engine.errors import InvalidArgument
from patchserve.engine.metrics import Grader
from patchserve.engine.runs import CapturedRun
from patchserve.engine.sweep import Cell, SweepOutcome, SweepSpec, cell_key
from patchserve.engine.sweep_grading import graded_answer, token_grader
from patchserve.engine.sweep_rows import source_row
from patchserve.engine.sweep_runner import SweepRunner, sweep_warnings
from patchserve.models import HookContext, Transformer
from patchserve.models.hooks import SiteLayout, blend
from patchserve.text.alignment import Alignment, align
from patchserve.wire.grids import assemble_grid
from patchserve.wire.requests import SweepMethod
from patchserve.wire.sweep import UNALIGNED

METHODS: tuple[str, ...] = get_args(SweepMethod)
DEFAULT_VERIFY_TOP_K = 10
CellKey = tuple[str, int, int | None, int | None]


def check_method_scope(
    method: str, *, answer_tokens: int, window: int, per_position: bool, noise: bool = False
) -> None:
    """Refuse what the first-order estimate does not define yet (a 400, never a silent
    estimate of something else): multi-token answers, windows, (layer, head) cells over all
    positions and noise corruption are exact-only."""
    if method == "exact":
        return
    for refused, what, param in (
        (answer_tokens > 1, "a multi-token answer", "answer_token"),
        (window > 1, "window > 1", "window"),
        (not per_position, "per_position false", "per_position"),
        (noise, "noise corruption", "corruption"),
    ):
        if refused:
            raise InvalidArgument(
                f"method {method!r} does not support {what} yet; use method 'exact'", param
            )


def check_method(method: str, verify_top_k: int | None) -> int:
    """Validate ``method`` / ``verify_top_k``; the number of cells to verify (0: none)."""
    if method not in METHODS:
        raise InvalidArgument(
            f"unknown method {method!r}; expected one of {', '.join(METHODS)}", "method"
        )
    if method != "attribution+verify":
        if verify_top_k is not None:
            raise InvalidArgument("verify_top_k needs method 'attribution+verify'", "verify_top_k")
        return 0
    k = DEFAULT_VERIFY_TOP_K if verify_top_k is None else verify_top_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgument("verify_top_k must be an integer >= 1", "verify_top_k")
    return k


@dataclass
class GradSites(HookContext):
    """Captures its sites detached and adds a zero leaf there, whose gradient is the site's."""

    leaves: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def site(self, layer: int, hook: str, h: torch.Tensor, layout: SiteLayout) -> torch.Tensor:
        h = super().site(layer, hook, h, layout)
        key = (layer, hook)
        if key in self.capture:
            leaf = torch.zeros_like(h, requires_grad=True)
            self.leaves[key] = leaf
            self.captured[key] = h.detach()
            h = h + leaf
        return h


def raw_quantity(logits: torch.Tensor, grader: Grader) -> torch.Tensor:
    """The metric's raw quantity ``q`` of last-position ``[vocab]`` logits (float64, with grad)."""
    logits = logits.double()
    if grader.metric == "logit_diff" or (grader.metric == "recovered" and grader.foil is not None):
        assert grader.foil is not None
        return logits[grader.answer] - logits[grader.foil]
    logp = torch.log_softmax(logits, dim=-1)
    if grader.metric != "kl":
        return logp[grader.answer]
    assert grader.clean_logprobs is not None
    p_clean = grader.clean_logprobs.to(logits.device)
    terms = torch.exp(p_clean) * (p_clean - logp)
    return torch.where(torch.isinf(p_clean), torch.zeros_like(terms), terms).sum()


def grade_raw(grader: Grader, q: np.ndarray) -> np.ndarray:
    """Metric values of raw quantities ``q`` (the inverse view of :func:`raw_quantity`)."""
    if grader.metric == "kl":
        return grader.score(None, kl=q)
    if grader.metric == "logit_diff" or (grader.metric == "recovered" and grader.foil is not None):
        return grader.score(None, logit_diff=q)
    return grader.score(q)


@dataclass
class Estimates:
    """First-order estimates of every cell, in the sweep's cell order."""

    cells: list[Cell]
    change: dict[CellKey, float]  # |estimated value - corrupt value| of each aligned cell
    grader: Grader
    baseline: float  # the metric of the corrupt run (this forward's)
    corrupt_raw: float
    clean: float | None
    logits: torch.Tensor
    alignment: Alignment | None


class AttributionRunner:
    """Runs ``method="attribution"`` or ``"attribution+verify"`` for one sweep spec."""

    def __init__(
        self,
        model: Transformer,
        spec: SweepSpec,
        on_cell: Callable[[Cell, int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        gate: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        self.model, self.spec = model, spec
        self.on_cell, self.cancel = on_cell, cancel
        self.gate = gate if gate is not None else nullcontext

    def run(self) -> SweepOutcome:
        started = time.perf_counter()
        if self.spec.source is None:
            raise ValueError("spec.source is not set (prepare_sweep(source=None) leaves it to you)")
        est = self.estimate()
        total = len(est.cells)
        for done, cell in enumerate(est.cells, 1):
            self._emit(cell, done, total)
        if self.spec.method == "attribution+verify":
            outcome = self._verify(est)
        else:
            outcome = self._outcome(est, est.cells)
        seconds = time.perf_counter() - started
        outcome.stats.update(seconds=seconds, cells=total)
        outcome.stats["cells_per_second"] = total / seconds if seconds > 0 else 0.0
        return outcome

    def _emit(self, cell: Cell, done: int, total: int) -> None:
        if self.on_cell is not None:
            self.on_cell(cell, done, total)

    # -- the estimate -----------------------------------------------------------------

    def _gradients(
        self,
    ) -> tuple[dict[tuple[int, str], torch.Tensor], dict[tuple[int, str], torch.Tensor], Grader]:
        """One corrupt forward and one backward: (activations, gradients) per site, grader."""
        spec, model = self.spec, self.model
        sites = [(layer, hook) for hook in spec.hooks for layer in spec.layers]
        ctx = GradSites(capture=set(sites))
        ids = torch.tensor([spec.corrupt_ids], device=model.device)
        with torch.inference_mode(False), torch.enable_grad(), self.gate():
            logits = model.prefill(ids, ctx).logits[0]
            answer = graded_answer(spec, logits.detach())[0]
            grader, _ = token_grader(spec, logits.detach(), answer)
            q = raw_quantity(logits, grader)
            leaves = [ctx.leaves[site] for site in sites]
            grads = torch.autograd.grad(q, leaves, allow_unused=True)
        self._q0, self._logits = float(q.detach()), logits.detach().float()
        grad = {
            site: torch.zeros_like(leaf) if g is None else g
            for site, leaf, g in zip(sites, leaves, grads, strict=True)
        }
        return (
            {site: ctx.captured[site][0] for site in sites},
            {s: g[0] for s, g in grad.items()},
            grader,
        )

    def estimate(self) -> Estimates:
        spec = self.spec
        alignment = None
        if isinstance(spec.source, CapturedRun):
            alignment = align(spec.source.token_ids, spec.corrupt_ids)
        acts, grads, grader = self._gradients()
        _, clean = token_grader(spec, self._logits, grader.answer)
        baseline = float(grade_raw(grader, np.array([self._q0]))[0])
        cells: list[Cell] = []
        change: dict[CellKey, float] = {}
        with torch.no_grad():
            for hook in spec.hooks:
                for layer in spec.layers:
                    site = (layer, hook)
                    rows = self._changes(hook, layer, acts[site], grads[site], alignment)
                    cells += self._graded(rows, grader, baseline, change)
        return Estimates(
            cells=cells,
            change=change,
            grader=grader,
            baseline=baseline,
            corrupt_raw=self._q0,
            clean=clean,
            logits=self._logits.cpu(),
            alignment=alignment,
        )

    def _changes(
        self,
        hook: str,
        layer: int,
        acts: torch.Tensor,
        grad: torch.Tensor,
        alignment: Alignment | None,
    ) -> list[tuple[Cell, float | None]]:
        """Each cell of one site with its estimated change of ``q`` (None: unaligned)."""
        spec = self.spec
        sources = {p: source_row(spec, hook, layer, p, alignment) for p in spec.positions}
        aligned = [p for p in spec.positions if sources[p] is not None]
        changes: dict[int, list[float]] = {}
        if aligned:
            index = torch.tensor(aligned, device=acts.device)
            dest, g = acts.index_select(0, index), grad.index_select(0, index)
            src = torch.stack([sources[p].expand_as(dest[0]) for p in aligned])  # type: ignore[union-attr]
            if hook == "attn_head":
                picked = torch.tensor(spec.heads or [], device=acts.device)
                dest, src, g = dest[:, picked], src[:, picked], g[:, picked]
            weight = torch.full_like(dest, spec.alpha, dtype=torch.float32)
            mask = spec.masks.get(hook) if spec.masks else None
            if mask is not None:
                weight = weight * mask.to(weight.device)
            delta = blend(dest, src.to(dest.device), weight).double() - dest.double()
            dq = (delta * g.double()).sum(-1).reshape(len(aligned), -1)
            changes = dict(zip(aligned, dq.tolist(), strict=True))
        heads: list[int | None] = list(spec.heads or []) if hook == "attn_head" else [None]
        return [
            (Cell(hook, layer, p, head), changes[p][k] if p in changes else None)
            for p in spec.positions
            for k, head in enumerate(heads)
        ]

    def _graded(
        self,
        rows: list[tuple[Cell, float | None]],
        grader: Grader,
        baseline: float,
        change: dict[CellKey, float],
    ) -> list[Cell]:
        aligned = [(c, d) for c, d in rows if d is not None]
        q = np.array([self._q0 + d for _, d in aligned], dtype=np.float64)
        values = grade_raw(grader, q) if len(q) else np.zeros(0)
        for (cell, _), value in zip(aligned, values.tolist(), strict=True):
            cell.value, cell.kind = value, "estimate"
            change[cell_key(cell)] = abs(value - baseline)
        for cell, d in rows:
            if d is None:
                cell.skipped = UNALIGNED
        return [cell for cell, _ in rows]

    # -- results ----------------------------------------------------------------------

    def _outcome(self, est: Estimates, cells: list[Cell]) -> SweepOutcome:
        spec, grader = self.spec, est.grader
        grids: dict[str, list[Any]] = {}
        best: dict[str, Cell | None] = {}
        kinds: dict[str, list[Any]] = {}
        for hook in spec.hooks:
            heads = spec.heads if hook == "attn_head" else None
            own = [c for c in cells if c.hook == hook]
            grids[hook], best[hook] = assemble_grid(
                own, spec.layers, spec.positions, heads, spec.metric
            )
            kinds[hook] = kinds_grid(own, spec, hook)
        reported = est.corrupt_raw if spec.metric == "recovered" else est.baseline
        return SweepOutcome(
            hooks=spec.hooks,
            layers=spec.layers,
            positions=spec.positions,
            heads=spec.heads if "attn_head" in spec.hooks else None,
            metric=spec.metric,
            answer=grader.answer,
            foil=spec.foil,
            grids=grids,
            argmax=best,
            clean=est.clean,
            corrupt=reported,
            noise_floor=0.0,
            skipped=[c for c in cells if c.skipped is not None],
            alignment=est.alignment,
            corrupt_logits=est.logits,
            corrupt_ids=list(spec.corrupt_ids),
            stats={"estimated": len(est.change), "verified": 0, "computed": 0, "free": 0},
            warnings=sweep_warnings(spec, set()) + estimate_warnings(best),
            method=spec.method,
            kinds=kinds,
        )

    def _verify(self, est: Estimates) -> SweepOutcome:
        """Recompute the top cells exactly; the outcome with them merged in."""
        ranked = sorted(est.change, key=lambda k: est.change[k], reverse=True)
        only = set(ranked[: self.spec.verify_top_k])
        by_key = {cell_key(c): c for c in est.cells}
        total = len(est.cells)
        exact: list[Cell] = []

        def on_exact(cell: Cell, done: int, verified_total: int) -> None:
            merged = by_key[cell_key(cell)]
            merged.value, merged.kind, merged.error = cell.value, "exact", cell.error
            exact.append(merged)
            self._emit(merged, total + done, total + verified_total)

        spec = replace(self.spec, method="exact", only=only)
        runner = SweepRunner(self.model, spec, on_exact, self.cancel, self.gate)
        verified = runner.run()
        outcome = self._outcome(est, est.cells)
        outcome.clean, outcome.corrupt = verified.clean, verified.corrupt
        outcome.noise_floor, outcome.corrupt_logits = verified.noise_floor, verified.corrupt_logits
        outcome.stats.update(verified.stats)
        outcome.stats.update(estimated=len(est.change), verified=len(exact))
        return outcome


def estimate_warnings(best: dict[str, Cell | None]) -> list[str]:
    """Say loudly that the grid holds estimates, and when a reported argmax is one."""
    out = [
        "cells marked 'estimate' in kinds are first-order estimates, which can be far off "
        "where a patch saturates the answer; only cells marked 'exact' are computed"
    ]
    for hook, cell in best.items():
        if cell is not None and cell.kind == "estimate":
            out.append(
                f"the argmax of {hook} (layer {cell.layer}, position {cell.position}) is an "
                "estimate, not an exact value; verify more cells (a larger verify_top_k with "
                "'attribution+verify', or method 'exact')"
            )
    return out


def kinds_grid(cells: list[Cell], spec: SweepSpec, hook: str) -> list[Any]:
    """``exact`` / ``estimate`` of each cell of one hook, laid out as its grid (None: skipped)."""
    li = {layer: i for i, layer in enumerate(spec.layers)}
    pi = {p: j for j, p in enumerate(spec.positions)}
    heads = spec.heads if hook == "attn_head" else None
    hi = {h: k for k, h in enumerate(heads or [])}
    grid: list[Any] = [
        [[None] * len(heads) if heads is not None else None for _ in spec.positions]
        for _ in spec.layers
    ]
    for cell in cells:
        assert cell.position is not None  # per_position false is exact-only
        kind = None if cell.skipped else cell.kind
        row = grid[li[cell.layer]]
        if cell.head is None:
            row[pi[cell.position]] = kind
        else:
            row[pi[cell.position]][hi[cell.head]] = kind
    return grid
