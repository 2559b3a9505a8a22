"""The one Server-Sent Events codec of a sweep stream (docs/api.md §2 *Streaming*).

Each event is one ``data: JSON`` line and a blank line; the stream ends with
``data: [DONE]`` (the OpenAI convention). The server encodes with
:func:`encode`; the client and the command line decode with
:func:`iter_events` / :func:`aiter_events`, which frame the byte stream with
``httpx-sse`` (a maintained, spec-complete SSE parser: multi-line ``data``,
comments, CRLF) and validate each payload into its wire model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from httpx_sse import EventSource
from pydantic import TypeAdapter

from patchserve.wire.base import WireModel
from patchserve.wire.sweep import SWEEP_EVENT, SweepEvent

DONE_DATA = "[DONE]"
DONE = f"data: {DONE_DATA}\n\n".encode()


def encode(event: WireModel) -> bytes:
    """One event, framed (a JSON body never holds a raw newline)."""
    return f"data: {event.model_dump_json()}\n\n".encode()


def decode(data: str, adapter: TypeAdapter[Any] = SWEEP_EVENT) -> SweepEvent | None:
    """The event of one ``data`` payload; ``None`` for the final ``[DONE]``. ``adapter``:
    the stream's event union (a study's: ``wire.study.STUDY_EVENT``)."""
    if data.strip() == DONE_DATA:
        return None
    return adapter.validate_json(data)  # type: ignore[no-any-return]


def iter_events(response: httpx.Response) -> Iterator[SweepEvent]:
    """The events of a streamed sweep response, up to ``[DONE]``."""
    for sse in EventSource(response).iter_sse():
        event = decode(sse.data)
        if event is None:
            return
        yield event


async def aiter_events(
    response: httpx.Response, adapter: TypeAdapter[Any] = SWEEP_EVENT
) -> AsyncIterator[Any]:
    """The events of a streamed sweep (or study) response, up to ``[DONE]`` (async)."""
    async for sse in EventSource(response).aiter_sse():
        event = decode(sse.data, adapter)
        if event is None:
            return
        yield event
