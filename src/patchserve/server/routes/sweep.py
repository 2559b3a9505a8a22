"""``POST /v1/patch_sweep``: one call, one study (SPEC §2)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from typing import Any, TypeVar

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from patchserve.engine import (
    CapturedRun,
    RequestError,
    SweepOutcome,
    SweepSpec,
    VectorSource,
    capture_run,
    check_run_name,
    prepare_sweep,
    run_sweep,
    stream_sweep,
)
from patchserve.engine.request import parse_hooks
from patchserve.models import INJECTABLE_HOOKS
from patchserve.server.schemas import PatchSweepRequest
from patchserve.server.state import ServerState
from patchserve.server.vectors import mask_vector, table_row, unpack_table

router = APIRouter()
T = TypeVar("T")


def _check_width(vector: np.ndarray, hooks: list[str], state: ServerState, param: str) -> None:
    for hook in hooks:
        width = state.model.cfg.hook_width(hook)
        if vector.shape[0] != width:
            raise RequestError(
                f"{param} is {vector.shape[0]} wide; hook {hook} is {width} wide", param
            )


def _vector_source(
    state: ServerState, req: PatchSweepRequest, hooks: list[str], table: np.ndarray | None
) -> VectorSource | None:
    if req.source_module is None and req.source_inline is None:
        return None
    if req.source_module is not None and req.source_inline is not None:
        raise RequestError("give one of source_module and source_inline", "source_module")
    if req.source_run is not None:
        raise RequestError(
            "a sweep has one source: source_run or source_module/source_inline", "source_run"
        )
    model, modules = state.model, state.modules
    like = model.embed_tokens.weight
    if req.source_module is not None:
        name = req.source_module
        if not modules.exists(name):
            raise RequestError(f"unknown module {name!r}", "source_module")
        for hook in hooks:  # every swept site must have a vector, checked before any work
            for layer in range(model.cfg.num_layers):
                modules.vector(name, hook, layer, model.cfg.hook_width(hook), like)
        return VectorSource(
            name,
            lambda hook, layer: modules.vector(name, hook, layer, model.cfg.hook_width(hook), like),
        )
    assert req.source_inline is not None
    row = table_row(table, req.source_inline, None, "source_inline")
    _check_width(row, hooks, state, "source_inline")
    vector = torch.from_numpy(row.copy()).to(device=like.device, dtype=like.dtype)
    return VectorSource("inline", lambda hook, layer: vector)


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
                if req.clean_prompt is None:
                    missing = (
                        f"source run {req.source_run!r} not found"
                        if req.source_run
                        else ("no source given")
                    )
                    raise RequestError(
                        f"{missing}: give clean_prompt to capture it in this call, "
                        "or source_module / source_inline for a vector sweep",
                        "source_run" if req.source_run else "clean_prompt",
                        code=404 if req.source_run else 400,
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
            layers=req.layers.model_dump() if hasattr(req.layers, "model_dump") else req.layers,
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

    def capture(self) -> None:
        """The one-call auto-capture: every injectable hook of the swept layers."""
        if not self.auto_captured:
            return
        assert self.capture_name is not None and self.clean_ids is not None
        layers = sorted(set(self.spec.layers))
        hooks = {hook: layers for hook in INJECTABLE_HOOKS}
        run = self.state.gated(
            lambda: capture_run(
                self.state.model, self.capture_name, self.req.clean_prompt, self.clean_ids, hooks
            )
        )
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

    def body(self, outcome: SweepOutcome) -> dict[str, Any]:
        state, req = self.state, self.req
        body = outcome.to_json()
        k = req.logprobs
        baselines: dict[str, Any] = {
            "corrupt": {
                "value": outcome.corrupt,
                "top_logprobs": state.top_logprobs(outcome.corrupt_logits, k),
            }
        }
        if self.run is not None and self.run.last_logits is not None:
            baselines["clean"] = {
                "value": outcome.clean,
                "top_logprobs": state.top_logprobs(self.run.last_logits, k),
            }
        body.update(
            object="patch_sweep",
            model=state.model_name,
            hooks=outcome.hooks,
            tokens=self.tokens,
            answer_token=state.tokenizer.decode([outcome.answer]),
            auto_captured=self.auto_captured,
            captured_source_run=self.capture_name if self.auto_captured else None,
            source_run=self.run.name if self.run is not None else None,
            baselines=baselines,
        )
        return body

    def start_event(self) -> dict[str, Any]:
        spec = self.spec
        event = {
            "type": "start",
            "layers": spec.layers,
            "positions": spec.positions,
            "hooks": spec.hooks,
            "metric": spec.metric,
            "tokens": self.tokens,
            "auto_captured": self.auto_captured,
            "captured_source_run": self.capture_name if self.auto_captured else None,
            "total": spec.num_cells,
        }
        if "attn_head" in spec.hooks:
            event["heads"] = spec.heads
        return event

    def record(self, outcome: SweepOutcome) -> None:
        metrics = self.state.metrics
        metrics.sweeps.inc()
        metrics.cells.inc(outcome.stats["cells"])
        metrics.cells_per_second.set(outcome.stats["cells_per_second"])


def _sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


@router.post("/v1/patch_sweep")
async def patch_sweep(req: PatchSweepRequest, request: Request):
    state: ServerState = request.app.state.patchserve
    job = SweepJob(state, req)  # every validation error is a JSON 4xx, stream or not
    try:
        await state.run_blocking(job.capture)
    except BaseException:
        job.finish()
        raise
    if not req.stream:
        with ExitStack() as stack:
            stack.callback(job.finish)
            if job.run is not None:
                stack.enter_context(state.store.lease(job.run))
            spec: SweepSpec = job.spec
            outcome = await state.run_blocking(
                lambda: run_sweep(state.model, spec, gate=state.gate.turn)
            )
        job.record(outcome)
        return JSONResponse(job.body(outcome))

    async def events() -> AsyncIterator[bytes]:
        with ExitStack() as stack:
            stack.callback(job.finish)  # also on a client disconnect
            if job.run is not None:
                stack.enter_context(state.store.lease(job.run))
            try:
                yield _sse(job.start_event())
                async for item in stream_sweep(
                    state.model, job.spec, runner=job.run_then_finish, gate=state.gate.turn
                ):
                    if item[0] == "cell":
                        _, cell, done, total = item
                        yield _sse(cell.to_event(done, total))
                    else:
                        outcome = item[1]
                        job.record(outcome)
                        yield _sse({"type": "summary", **job.body(outcome)})
            except RequestError as exc:  # raised inside the sweep (e.g. clean == corrupt)
                error = {
                    "message": exc.message,
                    "type": exc.type,
                    "param": exc.param,
                    "code": exc.code,
                }
                yield _sse({"type": "error", "error": error})
            yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")
