"""A sweep's outcome in its wire shape: the body, the stream's events, baselines' top-k.

The server's routes and the command line's in-process path both build their
answers here, so the two can never drift.
"""

from __future__ import annotations

from typing import cast

import torch

from patchserve.engine.diagnostics import improbable_answer_warning
from patchserve.engine.runs import CapturedRun
from patchserve.engine.sweep import Cell, SweepOutcome, SweepSpec
from patchserve.text.tokenizer import Tokenizer
from patchserve.wire.requests import SweepMethod
from patchserve.wire.sweep import (
    AlignmentSummary,
    Argmax,
    Baseline,
    Baselines,
    CellEvent,
    CellKind,
    HookGrid,
    NoiseSummary,
    SkippedCell,
    StartEvent,
    SweepBody,
    Timing,
    TopLogprob,
)


def top_logprobs(tokenizer: Tokenizer, logits: torch.Tensor, k: int) -> list[TopLogprob]:
    """The ``k`` most likely next tokens of last-position ``logits`` ``[vocab]``."""
    lp = torch.log_softmax(logits.double(), -1)
    values, ids = lp.topk(min(k, lp.shape[-1]))
    return [
        TopLogprob(token_id=int(i), token=tokenizer.decode([int(i)]), logprob=float(v))
        for v, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


def cell_event(cell: Cell, done: int, total: int, method: str = "exact") -> CellEvent:
    return CellEvent(
        hook=cell.hook,
        layer=cell.layer,
        position=cell.position,
        head=cell.head,
        value=cell.value,
        error=cell.error,
        stderr=cell.stderr,
        done=done,
        total=total,
        kind=None if method == "exact" else cast(CellKind, cell.kind),
    )


def start_event(
    spec: SweepSpec, tokens: list[str], *, auto_captured: bool, captured_source_run: str | None
) -> StartEvent:
    return StartEvent(
        hook=spec.hooks[0],
        hooks=spec.hooks,
        layers=spec.layers,
        positions=spec.positions,
        heads=spec.heads if "attn_head" in spec.hooks else None,
        per_position=spec.per_position,
        metric=spec.metric,
        tokens=tokens,
        auto_captured=auto_captured,
        captured_source_run=captured_source_run,
        total=spec.num_cells,
    )


def _argmax(cell: Cell | None) -> Argmax | None:
    if cell is None or cell.value is None:
        return None
    return Argmax(layer=cell.layer, position=cell.position, value=cell.value, head=cell.head)


def _skipped(cell: Cell) -> SkippedCell:
    assert cell.skipped is not None
    return SkippedCell(
        hook=cell.hook,
        layer=cell.layer,
        position=cell.position,
        head=cell.head,
        reason=cell.skipped,
    )


def sweep_body(
    outcome: SweepOutcome,
    *,
    model_name: str,
    tokenizer: Tokenizer,
    tokens: list[str],
    source_run: CapturedRun | None,
    hooks_given: bool,
    auto_captured: bool,
    captured_source_run: str | None,
    top_k: int,
    window: int = 1,
    noise: NoiseSummary | None = None,
) -> SweepBody:
    """The whole response body. ``hooks_given``: the request used ``hooks`` (then
    ``hook_grids`` lists every hook, even one; else it is null, as in the seed)."""
    first = outcome.hooks[0]
    clean_logits = source_run.last_logits if source_run is not None else None
    warnings = list(outcome.warnings)
    if clean_logits is not None:
        warnings += improbable_answer_warning(tokenizer, clean_logits, outcome.answer)
    return SweepBody(
        model=model_name,
        hook=first,
        hooks=outcome.hooks,
        layers=outcome.layers,
        positions=outcome.positions,
        heads=outcome.heads,
        per_position=outcome.per_position,
        metric=outcome.metric,
        answer_token_id=outcome.answer,
        answer_token=tokenizer.decode(outcome.answer_ids),
        answer_token_ids=outcome.answer_ids,
        foil_token_id=outcome.foil,
        foil_token=None if outcome.foil_ids is None else tokenizer.decode(outcome.foil_ids),
        foil_token_ids=outcome.foil_ids,
        grid=outcome.grids[first],
        argmax=_argmax(outcome.argmax[first]),
        hook_grids=_hook_grids(outcome) if hooks_given else None,
        clean=outcome.clean,
        corrupt=outcome.corrupt,
        noise_floor=outcome.noise_floor,
        skipped=[_skipped(cell) for cell in outcome.skipped],
        alignment=None
        if outcome.alignment is None or source_run is None
        else AlignmentSummary.of(outcome.alignment, source_run.token_ids, outcome.corrupt_ids),
        warnings=warnings,
        tokens=tokens,
        timing=_timing(outcome.stats),
        auto_captured=auto_captured,
        captured_source_run=captured_source_run,
        source_run=source_run.name if source_run is not None else None,
        baselines=_baselines(outcome, tokenizer, clean_logits, top_k),
        window=window,
        stderr_grid=outcome.stderr[first] if outcome.stderr else None,
        noise=noise,
        method=cast(SweepMethod, outcome.method),
        kinds=outcome.kinds,
    )


def _baselines(
    outcome: SweepOutcome, tokenizer: Tokenizer, clean_logits: torch.Tensor | None, top_k: int
) -> Baselines:
    """The unpatched corrupt run and (with a source run's logits) the clean run."""
    corrupt = Baseline(
        value=outcome.corrupt,
        top_logprobs=top_logprobs(tokenizer, outcome.corrupt_logits, top_k),
    )
    if clean_logits is None or outcome.clean is None:
        return Baselines(corrupt=corrupt, clean=None)
    clean = Baseline(value=outcome.clean, top_logprobs=top_logprobs(tokenizer, clean_logits, top_k))
    return Baselines(corrupt=corrupt, clean=clean)


def _hook_grids(outcome: SweepOutcome) -> list[HookGrid]:
    return [
        HookGrid(
            hook=h,
            grid=outcome.grids[h],
            argmax=_argmax(outcome.argmax[h]),
            stderr=outcome.stderr[h] if outcome.stderr else None,
        )
        for h in outcome.hooks
    ]


def _timing(stats: dict[str, float | int]) -> Timing:
    return Timing(
        seconds=float(stats["seconds"]),
        cells=int(stats["cells"]),
        cells_per_second=float(stats["cells_per_second"]),
        cells_computed=int(stats["computed"]),
        cells_free=int(stats["free"]),
    )
