"""/openapi.json is complete and true: every status a route answers, every body's schema,
and Schemathesis finds no response that breaks it."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import Server, start_server
from patchserve.wire.hooks import HOOKS, METRICS

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    )
)


@pytest.fixture(scope="module")
def fuzzed(server_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own: the fuzzer registers, overwrites and deletes things."""
    source_dir = tmp_path_factory.mktemp("fuzzed-sources")
    srv = start_server(server_checkpoint, "--source-dir", str(source_dir))
    yield srv
    srv.stop()


def operations(schema: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_every_operation_documents_its_answers(client):
    schema = client.get("/openapi.json").json()
    assert {path for path, _, _ in operations(schema)} >= {
        "/v1/patch_sweep",
        "/v1/patch_source",
        "/v1/patch_source/{run}",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/steering/modules/register",
        "/v1/steering/modules",
        "/v1/steering/modules/{name}",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/metrics",
    }
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components  # this server answers 400, never 422
    for path, method, operation in operations(schema):
        responses = operation["responses"]
        assert "422" not in responses, (method, path)
        assert "500" in responses, (method, path)
        ok = responses["200"]["content"]
        assert any("schema" in media and media["schema"] for media in ok.values()), (method, path)
        if path.startswith("/v1"):
            assert "401" in responses, (method, path)
        if method == "post":
            assert {"400", "413"} <= set(responses), (method, path)
        for code, answer in responses.items():
            if code.startswith(("4", "5")):
                ref = answer["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (method, path, code)
    sweep = schema["paths"]["/v1/patch_sweep"]["post"]["responses"]
    assert {"400", "401", "404", "413", "500"} <= set(sweep)
    assert set(sweep["200"]["content"]) == {"application/json", "text/event-stream"}
    assert sweep["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SweepBody")
    assert "409" in schema["paths"]["/v1/patch_source"]["post"]["responses"]
    request = components["PatchSweepRequest"]["properties"]
    assert enum_of(request["metric"], components) == list(METRICS)
    assert enum_of(request["hook"], components) == list(HOOKS)


def enum_of(prop: dict, components: dict) -> list[str]:
    """The enum of a (possibly nullable, possibly referenced) string property."""
    for option in [prop, *prop.get("anyOf", [])]:
        if "$ref" in option:
            option = components[option["$ref"].rsplit("/", 1)[1]]
        if "enum" in option:
            return option["enum"]
    raise AssertionError(f"no enum in {prop}")


def schemathesis_run(
    server: Server, max_examples: int, seed: int, workdir: Path, *report: str
) -> tuple[int, str]:
    """Run Schemathesis' CLI over every operation (its cache in ``workdir``, not the
    checkout; ``report``: more options, e.g. a report into ``workdir``); (generated cases,
    output)."""
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            str(max_examples),
            "--seed",
            str(seed),
            "--request-timeout",
            "120",
            *report,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=workdir,
        env={"NO_COLOR": "1", "PATH": str(Path(sys.executable).parent)},
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    match = re.search(r"(\d+) generated, (\d+) passed", output)
    assert match is not None, output[-3000:]
    generated, passed = int(match[1]), int(match[2])
    assert generated == passed and "Tested: 16" in output, output[-3000:]
    return generated, output


def streamed_answers(cassette: Path) -> Counter[str]:
    """How many 200 event streams a Schemathesis run received (and so checked), per path."""
    counts: Counter[str] = Counter()
    for interaction in yaml.load(cassette.read_text(), Loader=yaml.CSafeLoader)[
        "http_interactions"
    ]:
        answer = interaction["response"]
        content_type = str(answer["headers"].get("content-type"))
        if answer["status"]["code"] == "200" and "text/event-stream" in content_type:
            counts[urlsplit(interaction["request"]["uri"]).path] += 1
    return counts


def test_schemathesis_finds_no_nonconforming_answer(fuzzed, tmp_path):
    vcr = ("--report", "vcr", "--report-dir", str(tmp_path))
    generated, _ = schemathesis_run(fuzzed, 8, 1, tmp_path, *vcr)
    assert generated > 1000  # coverage phase + fuzzing over all 15 operations
    # The documented examples stream too: their events were checked against /openapi.json.
    (cassette,) = tmp_path.glob("vcr-*.yaml")
    streamed = streamed_answers(cassette)
    assert streamed["/v1/patch_sweep"] >= 2 and streamed["/v1/patch_study"] >= 1, streamed
    # ... and every other streaming route's (the short pass of `make test` covers them all)
    assert streamed["/v1/completions"] >= 1 and streamed["/v1/chat/completions"] >= 1, streamed


@pytest.mark.long
def test_schemathesis_long_run(fuzzed, tmp_path):
    generated, _ = schemathesis_run(fuzzed, max_examples=300, seed=7, workdir=tmp_path)
    print(f"schemathesis: {generated} cases passed")  # -s shows the count


def test_docs_pages_load_everything_from_the_server(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        assert assets, page
        for asset in assets:
            assert not asset.startswith(("http://", "https://", "//")), (page, asset)
            fetched = client.get(asset)
            assert fetched.status_code == 200 and len(fetched.content) > 100, asset


def test_every_route_and_request_field_is_described(client):
    schema = client.get("/openapi.json").json()
    for path, method, operation in operations(schema):
        assert operation.get("description"), (method, path)
    components = schema["components"]["schemas"]
    for name, component in components.items():
        if not name.endswith("Request") and name not in {"PatchEntry", "SteerEntry"}:
            continue
        for field, prop in component.get("properties", {}).items():
            assert prop.get("description"), (name, field)
