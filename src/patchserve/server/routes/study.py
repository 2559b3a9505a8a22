"""``POST /v1/patch_study``: many facts traced alike, one grid each and ROME's aggregate
(docs/api.md §2b) — parse, the fact study (``engine/study_items.py``), JSON or its stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import StreamingResponse

from patchserve.engine.study_items import FactStudy
from patchserve.errors import StudyError
from patchserve.server.errors import error_responses, status_of
from patchserve.server.openapi import event_stream
from patchserve.server.state import ServerState
from patchserve.wire import sse
from patchserve.wire.errors import error_body
from patchserve.wire.study import PatchStudyBody, PatchStudyRequest, StudyEvent
from patchserve.wire.sweep import ErrorEvent

router = APIRouter()

_ITEMS = [
    {"prompt": "The capital of Rorsun is", "corruption": {"type": "noise", "span": "Rorsun"}},
    {
        "prompt": "The capital of Rorsun is",
        "corruption": {"type": "replace", "prompt": "The capital of Sunror is"},
    },
]
EXAMPLES: dict[str, Any] = {  # see routes/sweep.py
    "study": {"summary": "Two facts, JSON", "value": {"items": _ITEMS}},
    "stream": {
        "summary": "Two facts at two hooks, streamed item by item",
        "value": {"items": _ITEMS, "hooks": ["post_block", "mlp_out"], "stream": True},
    },
}


@router.post(
    "/v1/patch_study",
    response_model=PatchStudyBody,
    responses={
        200: {
            "description": "Every item's sweep body and the aggregate on ROME's token roles; "
            "with `stream: true` Server-Sent Events: start, item..., summary (= the body), [DONE]",
            "content": event_stream(StudyEvent),
        },
        **error_responses(400, 401, 404, 413, 500, 503, 507),
    },
)
async def patch_study(
    req: Annotated[PatchStudyRequest, Body(openapi_examples=EXAMPLES)], request: Request
) -> Any:
    """Trace many facts alike (noise on each subject, or a second prompt each) and average
    their grids on ROME's token roles: first/middle/last subject token, first subsequent
    token, further tokens, last token."""
    state: ServerState = request.app.state.patchserve
    state.check_model(req.model)
    study = await state.run_blocking(lambda: FactStudy(state.study_resources(), req))
    if not req.stream:
        return await state.run_cancellable(request.receive, study.run)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event in study.events(state.run_blocking):
                yield sse.encode(event)
        except StudyError as exc:
            detail = error_body(exc.message, status_of(exc), exc.param, exc.kind).error
            yield sse.encode(ErrorEvent(error=detail))
        yield sse.DONE

    return StreamingResponse(events(), media_type="text/event-stream")
