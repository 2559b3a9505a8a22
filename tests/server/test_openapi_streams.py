"""Every ``text/event-stream`` answer documents its events in /openapi.json (OpenAPI 3.2's
``itemSchema``), and Schemathesis validates each event of real streams against it."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.adapter.validators import validate_v3

from patchserve.server.openapi import document_event_streams, event_stream
from patchserve.wire import sse
from patchserve.wire.errors import ErrorDetail
from patchserve.wire.sweep import ErrorEvent
from server.test_patch_study_api import STUDY
from server.test_sweep_api import CLEAN, CORRUPT

#: Routes whose stream is OpenAI's chunk objects, then [DONE] (``stream: true``), and the
#: field that carries each choice's new text.
CHUNK_STREAMS = {
    "/v1/completions": "CompletionChunk",
    "/v1/chat/completions": "ChatCompletionChunk",
}
CHOICE_FIELD = {"CompletionChunk": "text", "ChatCompletionChunk": "delta"}
# Each streaming route's events, as docs/api.md §2 / §2b list them: type → model.
STREAMS = {
    "/v1/patch_sweep": {
        "start": "StartEvent",
        "cell": "CellEvent",
        "summary": "SummaryEvent",
        "error": "ErrorEvent",
    },
    "/v1/patch_study": {
        "start": "StudyStartEvent",
        "item": "StudyItemEvent",
        "summary": "StudySummaryEvent",
        "error": "ErrorEvent",
    },
}
SWEEP = {"prompt": CORRUPT, "clean_prompt": CLEAN, "hooks": ["post_block", "mlp_out"]}
ATTRIBUTION = {**SWEEP, "method": "attribution+verify", "verify_top_k": 3}


def component(schema: dict, ref: str) -> dict:
    prefix = "#/components/schemas/"
    assert ref.startswith(prefix), ref
    return schema["components"]["schemas"][ref[len(prefix) :]]


def test_every_event_stream_documents_its_events(client):
    schema = client.get("/openapi.json").json()
    validate_v3(schema)  # a valid OpenAPI 3.2 document, the version that defines itemSchema
    assert schema["openapi"].startswith("3.2.")
    streaming = {
        path
        for path, item in schema["paths"].items()
        for operation in item.values()
        if "text/event-stream" in operation["responses"]["200"]["content"]
    }
    assert streaming == set(STREAMS) | set(CHUNK_STREAMS)
    for path, chunk in CHUNK_STREAMS.items():  # OpenAI's chunks: one model, no `type` field
        media = schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        assert "schema" not in media
        done, payload = media["itemSchema"]["properties"]["data"]["anyOf"]
        assert done["const"] == "[DONE]"
        content = payload["contentSchema"]  # the chunk model, inline
        assert content["title"] == chunk, path
        assert {"id", "choices", "usage"} <= set(content["properties"])
        choice = component(schema, content["properties"]["choices"]["items"]["$ref"])
        assert {"index", "finish_reason", CHOICE_FIELD[chunk]} <= set(choice["properties"])
    for path, events in STREAMS.items():
        media = schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        assert "schema" not in media  # 3.2: `schema` would describe the whole stream
        item = media["itemSchema"]
        assert item["required"] == ["data"]
        done, payload = item["properties"]["data"]["anyOf"]
        assert done["const"] == "[DONE]"
        assert payload["contentMediaType"] == "application/json"
        union = payload["contentSchema"]
        assert union["discriminator"]["propertyName"] == "type"
        mapping = union["discriminator"]["mapping"]
        assert {kind: ref.rsplit("/", 1)[1] for kind, ref in mapping.items()} == events, path
        assert sorted(option["$ref"] for option in union["oneOf"]) == sorted(mapping.values())
        for kind, ref in mapping.items():
            model = component(schema, ref)
            assert model["properties"]["type"]["const"] == kind, (path, kind)


def test_a_stream_model_documented_otherwise_under_its_name_is_refused():
    def document(error_detail: dict) -> dict:
        answer = {"content": event_stream(ErrorEvent)}
        return {
            "paths": {"/e": {"post": {"responses": {"200": answer}}}},
            "components": {"schemas": {"ErrorDetail": error_detail}},
        }

    same = document_event_streams(document(ErrorDetail.model_json_schema(mode="serialization")))
    media = same["paths"]["/e"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert set(media) == {"itemSchema"}  # the carried models went to the components
    with pytest.raises(ValueError, match="ErrorDetail"):
        document_event_streams(document({"type": "string"}))


@pytest.fixture(scope="module")
def documented(server) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def streamed(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response


def kinds(response: httpx.Response) -> list[str]:
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line]
    return [line if line == "[DONE]" else json.loads(line)["type"] for line in lines]


def altered(response: httpx.Response, old: str, new: str) -> httpx.Response:
    """The same answer with one event changed (``old`` → ``new``, first occurrence)."""
    text = response.text.replace(old, new, 1)
    assert text != response.text, old
    copy = httpx.Response(200, headers=response.headers, text=text, request=response.request)
    copy.elapsed = response.elapsed
    return copy


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/patch_sweep", SWEEP, {"start", "cell", "summary", "[DONE]"}),
        ("/v1/patch_sweep", ATTRIBUTION, {"start", "cell", "summary", "[DONE]"}),
        ("/v1/patch_study", STUDY, {"start", "item", "summary", "[DONE]"}),
    ],
    ids=["sweep", "attribution", "study"],
)
def test_schemathesis_validates_every_event_of_real_streams(
    client, documented, path, body, expected
):
    operation = documented[path]["POST"]
    response = streamed(client, path, body)
    assert set(kinds(response)) == expected
    operation.validate_response(response)  # raises on any event off its schema
    # An error event as the server frames it (a failure after the 200) is documented too.
    error = ErrorEvent(error=ErrorDetail(message="m", type="invalid_request_error", code=400))
    framed = sse.encode(error).decode()
    operation.validate_response(altered(response, "data: [DONE]", f"{framed}data: [DONE]"))


@pytest.mark.parametrize(
    ("path", "body", "old", "new"),
    [
        ("/v1/patch_sweep", SWEEP, '"post_block","layer":0,', '"post_block","layer":"0",'),
        ("/v1/patch_sweep", SWEEP, '"type":"cell",', '"type":"cells",'),
        ("/v1/patch_sweep", SWEEP, '"total":', '"totals":'),
        ("/v1/patch_study", STUDY, '"type":"item","index":0,', '"type":"item","index":"0",'),
        ("/v1/patch_study", STUDY, '"roles":[', '"roles":[0,'),
    ],
    ids=["cell-layer-type", "unknown-event", "start-missing-total", "item-index", "role-type"],
)
def test_schemathesis_rejects_a_wrong_event_field(client, documented, path, body, old, new):
    operation = documented[path]["POST"]
    response = streamed(client, path, body)
    operation.validate_response(response)
    with pytest.raises(AssertionError, match="SSE event violates schema"):
        operation.validate_response(altered(response, old, new))
