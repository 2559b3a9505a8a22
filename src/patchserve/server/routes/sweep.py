"""``POST /v1/patch_sweep``: one call, one study (docs/api.md §2) — parse, the study
service (``engine/service.py``), the wire model or its stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import StreamingResponse

from patchserve.engine.service import Study
from patchserve.errors import StudyError
from patchserve.server.errors import error_responses, status_of
from patchserve.server.openapi import event_stream
from patchserve.server.state import ServerState
from patchserve.wire import sse
from patchserve.wire.errors import error_body
from patchserve.wire.requests import PatchSweepRequest
from patchserve.wire.sweep import ErrorEvent, SweepBody, SweepEvent

router = APIRouter()

_FACT = {"prompt": "The capital of Sunror is", "clean_prompt": "The capital of Rorsun is"}
# Shown by /docs and sent as they are by a schema-driven fuzzer (Schemathesis' examples
# phase): every answer shape, the event streams included, is exercised and checked.
EXAMPLES: dict[str, Any] = {
    "grid": {"summary": "One grid, JSON", "value": {**_FACT, "answer_token": " Pesmum"}},
    "stream": {
        "summary": "Two hooks, streamed cell by cell",
        "value": {**_FACT, "hooks": ["attn_out", "mlp_out"], "stream": True},
    },
    "attribution": {
        "summary": "Attribution estimates, the top 3 verified, streamed",
        "value": {**_FACT, "method": "attribution+verify", "verify_top_k": 3, "stream": True},
    },
}


@router.post(
    "/v1/patch_sweep",
    response_model=SweepBody,
    responses={
        200: {
            "description": "The sweep's body; with `stream: true` Server-Sent Events: start, "
            "cell..., summary (= the body), [DONE]",
            "content": event_stream(SweepEvent),
        },
        **error_responses(400, 401, 404, 413, 500, 503, 507),
    },
)
async def patch_sweep(
    req: Annotated[PatchSweepRequest, Body(openapi_examples=EXAMPLES)], request: Request
) -> Any:
    """One call, one study: capture the clean run if needed, patch it into the corrupt
    prompt over hooks × layers × positions, grade every cell; JSON or Server-Sent Events."""
    state: ServerState = request.app.state.patchserve
    state.check_model(req.model)
    # every validation error is a JSON 4xx, stream or not; a source run may be read from disk
    study = await state.run_blocking(lambda: Study(state.study_resources(), req))
    try:
        await state.run_cancellable(request.receive, study.capture)
    except BaseException:
        study.finish()
        raise
    if not req.stream:  # a disconnect stops the sweep within a block (the stream: on close)
        outcome = await state.run_cancellable(request.receive, study.sweep_then_finish)
        state.record_sweep(outcome)
        return study.body(outcome)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event in study.events(state.run_blocking, on_outcome=state.record_sweep):
                yield sse.encode(event)
        except StudyError as exc:  # raised inside the sweep (e.g. clean == corrupt)
            detail = error_body(exc.message, status_of(exc), exc.param, exc.kind).error
            yield sse.encode(ErrorEvent(error=detail))
        yield sse.DONE

    return StreamingResponse(events(), media_type="text/event-stream")
