"""``/openapi.json``'s event streams: each ``text/event-stream`` answer documents its events.

A streaming route declares its answer's content with :func:`event_stream`, naming the wire
union of its events (``wire.sweep.SweepEvent``, ``wire.study.StudyEvent``; the wire models
stay their one owner). Each Server-Sent Event is documented as OpenAPI 3.2 does
(``itemSchema``, FastAPI's own shape for its SSE routes): an object whose ``data`` is either
the final ``[DONE]`` or a JSON document (``contentMediaType``) of the union
(``contentSchema``), so a schema-aware client or fuzzer (Schemathesis) validates every
event. :func:`document_event_streams` finishes the generated document: the unions' models
become components and the version says 3.2, the version that defines ``itemSchema``.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from patchserve.wire.sse import DONE_DATA

OPENAPI_VERSION = "3.2.0"
EVENT_STREAM = "text/event-stream"
_REF = "#/components/schemas/{model}"
_DEFS = "x-patchserve-event-models"  # carried from the route to the document, then removed


def item_schema(event_schema: dict[str, Any]) -> dict[str, Any]:
    """One Server-Sent Event whose ``data`` is ``[DONE]`` or JSON matching ``event_schema``."""
    done = {"const": DONE_DATA, "description": "the end of the stream"}
    event = {"contentMediaType": "application/json", "contentSchema": event_schema}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "anyOf": [done, event]},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }


def event_stream(events: Any) -> dict[str, Any]:
    """The ``content`` entry of a 200 answer that streams ``events`` (a wire model or a
    discriminated union of them): its ``itemSchema``; the models it names go to the
    components when :func:`document_event_streams` runs. The hook for every stream, e.g.
    ``event_stream(CompletionChunk)`` for completions with ``stream: true``."""
    schema = TypeAdapter(events).json_schema(ref_template=_REF, mode="serialization")
    models = schema.pop("$defs", {})
    return {EVENT_STREAM: {"itemSchema": item_schema(schema), _DEFS: models}}


def document_event_streams(document: dict[str, Any]) -> dict[str, Any]:
    """Move the stream events' models into the components (one per name: a model FastAPI
    already documents must be documented alike) and declare OpenAPI 3.2."""
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for path in document.get("paths", {}).values():
        for operation in path.values():
            for answer in operation.get("responses", {}).values():
                media = answer.get("content", {}).get(EVENT_STREAM)
                if media is None:
                    continue
                media.pop("schema", None)  # in 3.2 `schema` would describe the whole stream
                for name, model in media.pop(_DEFS, {}).items():
                    known = components.setdefault(name, model)
                    if known != model:
                        raise ValueError(f"two different schemas named {name!r} in /openapi.json")
    document["openapi"] = OPENAPI_VERSION
    return document
