"""``POST /v1/patch_sweep``: one call, one study (docs/api.md §2)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from patchserve.engine import (
    CapturedRun,
    InvalidArgument,
    SweepOutcome,
    SweepSpec,
    VectorSource,
    capture_run,
    check_run_name,
    prepare_sweep,
    run_sweep,
    stream_sweep,
)
from patchserve.engine.report import cell_event, start_event, sweep_body
from patchserve.errors import StudyError
from patchserve.models import INJECTABLE_HOOKS
from patchserve.server.errors import error_responses, status_of
from patchserve.server.state import ServerState
from patchserve.server.vectors import mask_vector, table_row, unpack_table
from patchserve.wire import sse
from patchserve.wire.axes import parse_hooks
from patchserve.wire.errors import error_body
from patchserve.wire.requests import LayerRange, PatchSweepRequest
from patchserve.wire.sweep import ErrorEvent, StartEvent, SummaryEvent, SweepBody

router = APIRouter()
log = logging.getLogger("patchserve.server")
T = TypeVar("T")


def _check_width(vector: np.ndarray, hooks: list[str], state: ServerState, param: str) -> None:
    for hook in hooks:
        width = state.model.cfg.hook_width(hook)
        if vector.shape[0] != width:
            raise InvalidArgument(
                f"{param} is {vector.shape[0]} wide; hook {hook} is {width} wide", param
            )


def _vector_source(
    state: ServerState, req: PatchSweepRequest, hooks: list[str], table: np.ndarray | None
) -> VectorSource | None:
    if req.source_module is None and req.source_inline is None:
        return None
    if req.source_module is not None and req.source_inline is not None:
        raise InvalidArgument("give one of source_module and source_inline", "source_module")
    if req.source_run is not None:
        raise InvalidArgument(
            "a sweep has one source: source_run or source_module/source_inline", "source_run"
        )
    if req.clean_prompt is not None:
        raise InvalidArgument(
            "clean_prompt has no use in a vector-sourced sweep (source_module/source_inline); "
            "drop it, or drop the vector source to patch from the clean run",
            "clean_prompt",
        )
    model, modules = state.model, state.modules
    like = model.embed_tokens.weight
    if req.source_module is not None:
        name = req.source_module
        if not modules.exists(name):
            raise InvalidArgument(f"unknown module {name!r}", "source_module")
        return VectorSource(
            name,
            lambda hook, layer: modules.vector(name, hook, layer, model.cfg.hook_width(hook), like),
        )
    assert req.source_inline is not None
    row = table_row(table, req.source_inline, None, "source_inline")
    _check_width(row, hooks, state, "source_inline")
    vector = torch.from_numpy(row.copy()).to(device=like.device, dtype=like.dtype)
    return VectorSource("inline", lambda hook, layer: vector)


def _check_module_covers(state: ServerState, name: str, spec: SweepSpec) -> None:
    """Every swept site has a vector in module ``name``: checked before any work."""
    like, cfg = state.model.embed_tokens.weight, state.model.cfg
    for hook in spec.hooks:
        for layer in spec.layers:
            state.modules.vector(name, hook, layer, cfg.hook_width(hook), like)


def _masks(
    state: ServerState, req: PatchSweepRequest, hooks: list[str], table: np.ndarray | None
) -> dict[str, torch.Tensor] | None:
    if req.mask is None:
        return None
    spec = req.mask
    return {
        hook: mask_vector(
            spec.indices,
            spec.inline,
            state.model.cfg.hook_width(hook),
            table,
            "mask",
            f"hook {hook}",
        )
        for hook in hooks
    }


class SweepJob:
    """One validated request: its spec, its source and what to do with it afterwards."""

    def __init__(self, state: ServerState, req: PatchSweepRequest) -> None:
        self.state, self.req = state, req
        self.run: CapturedRun | None = None
        self.auto_captured = False
        self.capture_name: str | None = None
        self.finished = False
        self.clean_ids: list[int] | None = None
        model, tok = state.model, state.tokenizer
        state.encode(req.prompt)  # length limit
        table = unpack_table(req.patch_vectors)
        hooks = parse_hooks(req.hook, req.hooks)
        vector = _vector_source(state, req, hooks, table)
        source: Any = vector
        if vector is None:
            if req.source_run is not None:
                check_run_name(req.source_run, "source_run")
                self.run = state.store.get(req.source_run)
            if self.run is None:
                if req.clean_prompt is None:  # a 400, not a 404, as in the seed
                    missing = (
                        f"source run {req.source_run!r} not found"
                        if req.source_run
                        else ("no source given")
                    )
                    raise InvalidArgument(
                        f"{missing}: give clean_prompt to capture it in this call, "
                        "or source_module / source_inline for a vector sweep",
                        "source_run" if req.source_run else "clean_prompt",
                    )
                self.clean_ids = state.encode(req.clean_prompt, "clean_prompt").ids
                self.auto_captured = True
                self.capture_name = req.source_run or state.store.fresh_name("sweep")
            source = self.run
        self.spec, self.tokens = prepare_sweep(
            model,
            tok,
            prompt=req.prompt,
            source=source,
            hook=req.hook,
            hooks=req.hooks,
            layers=req.layers.model_dump() if isinstance(req.layers, LayerRange) else req.layers,
            clean_ids=self.clean_ids,
            positions=[p.model_dump() if hasattr(p, "model_dump") else p for p in req.positions]
            if isinstance(req.positions, list)
            else req.positions,
            heads=req.heads,
            alpha=float(req.alpha),
            masks=_masks(state, req, hooks, table),
            answer_token=req.answer_token,
            answer_token_id=req.answer_token_id,
            foil_token=req.foil_token,
            foil_token_id=req.foil_token_id,
            metric=req.metric,
            clean_baseline=None if req.clean_baseline is None else float(req.clean_baseline),
            max_batch_tokens=state.config.max_batch_tokens,
            max_cells=state.config.max_cells,
        )
        if req.source_module is not None:
            _check_module_covers(state, req.source_module, self.spec)

    def capture(self) -> None:
        """The one-call auto-capture: every injectable hook of the swept layers."""
        if not self.auto_captured:
            return
        name, prompt, ids = self.capture_name, self.req.clean_prompt, self.clean_ids
        assert name is not None and prompt is not None and ids is not None
        layers = sorted(set(self.spec.layers))
        hooks = {hook: layers for hook in INJECTABLE_HOOKS}
        run = self.state.gated(lambda: capture_run(self.state.model, name, prompt, ids, hooks))
        run.kept = self.req.keep_source
        self.state.store.put(run, overwrite=True)
        self.run = run
        self.spec.source = run

    def finish(self) -> None:
        """Drop an auto-captured run unless asked to keep it (also after a cancel). Once."""
        if self.finished:
            return
        self.finished = True
        if self.auto_captured and self.capture_name is not None and not self.req.keep_source:
            self.state.store.drop(self.capture_name)
        self.state.refresh_gauges()

    async def run_then_finish(self, work: Callable[[], T]) -> T:
        """Run the sweep in a worker and finish as soon as it ends (or is cancelled), so the
        drop does not wait for the response stream, which a gone client may leave pending."""
        try:
            return await self.state.run_blocking(work)
        finally:
            self.finish()

    def body(self, outcome: SweepOutcome) -> SweepBody:
        return sweep_body(
            outcome,
            model_name=self.state.model_name,
            tokenizer=self.state.tokenizer,
            tokens=self.tokens,
            source_run=self.run,
            hooks_given=self.req.hooks is not None,
            auto_captured=self.auto_captured,
            captured_source_run=self.capture_name if self.auto_captured else None,
            top_k=self.req.logprobs,
        )

    def start_event(self) -> StartEvent:
        return start_event(
            self.spec,
            self.tokens,
            auto_captured=self.auto_captured,
            captured_source_run=self.capture_name if self.auto_captured else None,
        )

    def record(self, outcome: SweepOutcome) -> None:
        metrics = self.state.metrics
        metrics.sweeps.inc()
        metrics.cells.inc(outcome.stats["cells"])
        metrics.cells_per_second.set(outcome.stats["cells_per_second"])
        log.info(
            "sweep %s %s: %d cells in %.3f s (%d computed)",
            ",".join(outcome.hooks),
            outcome.metric,
            outcome.stats["cells"],
            outcome.stats["seconds"],
            outcome.stats["computed"],
        )


STREAM_CONTENT = {"text/event-stream": {"schema": {"type": "string"}}}


@router.post(
    "/v1/patch_sweep",
    response_model=SweepBody,
    responses={
        200: {
            "description": "The sweep's body; with `stream: true` Server-Sent Events: start, "
            "cell..., summary (= the body), [DONE]",
            "content": STREAM_CONTENT,
        },
        **error_responses(400, 401, 404, 413, 500, 503, 507),
    },
)
async def patch_sweep(req: PatchSweepRequest, request: Request) -> Any:
    """One call, one study: capture the clean run if needed, patch it into the corrupt
    prompt over hooks × layers × positions, grade every cell; JSON or Server-Sent Events."""
    state: ServerState = request.app.state.patchserve
    state.check_model(req.model)
    # every validation error is a JSON 4xx, stream or not; a source run may be read from disk
    job = await state.run_blocking(lambda: SweepJob(state, req))
    try:
        await state.run_cancellable(request.receive, job.capture)
    except BaseException:
        job.finish()
        raise
    if not req.stream:  # a disconnect stops the sweep within a block (the stream: on close)
        with ExitStack() as stack:
            stack.callback(job.finish)
            if job.run is not None:
                stack.enter_context(state.store.lease(job.run))
            spec: SweepSpec = job.spec
            outcome = await state.run_cancellable(
                request.receive, lambda: run_sweep(state.model, spec, gate=state.gate.turn)
            )
        job.record(outcome)
        return job.body(outcome)

    async def events() -> AsyncIterator[bytes]:
        with ExitStack() as stack:
            stack.callback(job.finish)  # also on a client disconnect
            if job.run is not None:
                stack.enter_context(state.store.lease(job.run))
            try:
                yield sse.encode(job.start_event())
                async for item in stream_sweep(
                    state.model, job.spec, runner=job.run_then_finish, gate=state.gate.turn
                ):
                    if item[0] == "cell":
                        _, cell, done, total = item
                        yield sse.encode(cell_event(cell, done, total))
                    else:
                        outcome = item[1]
                        job.record(outcome)
                        body = job.body(outcome)
                        yield sse.encode(SummaryEvent(**dict(body)))
            except StudyError as exc:  # raised inside the sweep (e.g. clean == corrupt)
                detail = error_body(exc.message, status_of(exc), exc.param, exc.kind).error
                yield sse.encode(ErrorEvent(error=detail))
            yield sse.DONE

    return StreamingResponse(events(), media_type="text/event-stream")
