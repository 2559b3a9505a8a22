"""Bounded input: body bytes, tokens, prompts, text and numbers are checked before any work.

Every oversize body is a 413 in the error shape, on every route, whether its
length is declared or it arrives chunked; a body far past the limit is never
read (the server's peak memory stays flat); lone surrogates and numbers that
would turn into ``inf``/``nan`` (or an absurd position) in torch are 400s.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from checkpoints import build_checkpoint
from conftest import Server, start_server

LIMIT = 64 * 1024
PROMPT = "When Mary and John went to the store"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def small(server_checkpoint: Path) -> Iterator[Server]:
    srv = start_server(
        server_checkpoint,
        "--max-body-bytes",
        str(LIMIT),
        "--max-prompt-tokens",
        "20",
        "--max-prompts",
        "3",
    )
    yield srv
    srv.stop()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _assert_error(response: httpx.Response, code: int, param: str | None = None) -> dict:
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str)
    if param is not None:
        assert error["param"] == param, error
    return error


def _routes(srv: Server) -> list[tuple[str, str]]:
    paths = httpx.get(f"{srv.url}/openapi.json").json()["paths"]
    return [
        (method.upper(), path.replace("{run}", "r").replace("{name}", "m"))
        for path, operations in paths.items()
        for method in operations
    ]


def test_an_oversize_body_is_a_413_on_every_route(small: Server):
    routes = _routes(small)
    assert len(routes) >= 12
    with small.client() as c:
        for method, path in routes:
            declared = c.request(method, path, content=b"x" * (LIMIT + 1))
            _assert_error(declared, 413)
            chunked = c.request(method, path, content=iter([b"x" * 40_000, b"x" * 40_000]))
            _assert_error(chunked, 413)
        assert c.get("/health").status_code == 200


def test_a_chunked_body_under_the_limit_is_served(small: Server):
    body = json.dumps({"prompt": "When Mary"}).encode()
    with small.client() as c:
        r = c.post("/tokenize", content=iter([body[:10], body[10:]]), headers=JSON)
        assert r.status_code == 200 and r.json()["count"] > 0


def _stream_chunked(url_port: int, total: int, chunk: int = 1 << 20) -> bytes:
    """POST ``total`` bytes chunked on a raw socket until the server stops reading."""
    with socket.create_connection(("127.0.0.1", url_port)) as s:
        s.sendall(
            b"POST /v1/patch_sweep HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"%x\r\n" % chunk + b" " * chunk + b"\r\n"
        try:
            for _ in range(total // chunk):
                s.sendall(piece)
        except OSError:
            pass  # the server answered and closed: the rest is never read
        s.settimeout(10)
        try:
            return s.recv(4096)
        except OSError:
            return b""


def test_a_huge_chunked_body_is_never_read_into_memory(small: Server):
    pid = small.process.pid
    before = _peak_rss_kib(pid)
    answer = _stream_chunked(int(small.url.rsplit(":", 1)[1]), total=200 * 2**20)
    assert not answer or answer.startswith(b"HTTP/1.1 413")
    grown_mib = (_peak_rss_kib(pid) - before) / 1024
    assert grown_mib < 16, f"peak RSS grew {grown_mib:.1f} MiB on a 200 MiB body"
    assert httpx.get(f"{small.url}/health").status_code == 200


def test_token_and_prompt_counts_are_bounded(small: Server):
    with small.client() as c:
        _assert_error(c.post("/tokenize", json={"prompt": "x " * 40}), 413, "prompt")
        _assert_error(c.post("/detokenize", json={"tokens": [1] * 21}), 413, "tokens")
        assert c.post("/detokenize", json={"tokens": [1] * 20}).status_code == 200
        many = {"prompt": ["a", "b", "c", "d"], "max_tokens": 1}
        _assert_error(c.post("/v1/completions", json=many), 413, "prompt")
        three = {"prompt": ["a", "b", "c"], "max_tokens": 1, "temperature": 0}
        assert len(c.post("/v1/completions", json=three).json()["choices"]) == 3
        _assert_error(c.post("/v1/completions", json={**three, "n": 2}), 413, "n")  # 6 rows


SURROGATE_BODIES = [
    ("/v1/patch_sweep", '{"prompt": "a\\ud800b", "source_module": "zeros"}', "prompt"),
    ("/v1/patch_sweep", '{"prompt": "x", "positions": [{"span": "\\udc00"}]}', "positions.0.span"),
    ("/v1/patch_source", '{"prompt": "x", "run": "\\ud83d"}', "run"),
    ("/v1/completions", '{"prompt": ["ok", "\\ud800"]}', "prompt.1"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\udfff"]}', "stop.0"),
    ("/v1/completions", '{"prompt": "x", "\\ud800": 1}', None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/steering/modules/register", '{"name": "\\ud800", "vectors": {}}', "name"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATE_BODIES)
def test_a_lone_surrogate_anywhere_is_a_400(small: Server, path: str, body: str, param: str):
    with small.client() as c:
        r = c.post(path, content=body.encode(), headers=JSON)
        error = _assert_error(r, 400)
        assert "lone surrogate" in error["message"]
        if param is not None:
            assert error["param"] == param
        else:
            assert error["param"] in (None, "messages.0.content")
    with small.client() as c:  # a valid pair (an emoji) is fine
        assert (
            c.post("/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}', headers=JSON).status_code
            == 200
        )


PATCH = {"layer": 0, "hook": "post_block", "dest_position": 0, "source_module": "zeros"}
SITE = '"layer": 0, "hook": "post_block", "source_module": "zeros"'
NUMBERS = [  # "@" stands for the number, written as raw JSON
    ("/v1/patch_sweep", '{"prompt": "x", "source_module": "zeros", "alpha": @}', "alpha"),
    ("/v1/patch_sweep", '{"prompt": "x", "source_module": "zeros", "clean_baseline": @}', None),
    ("/v1/completions", '{"prompt": "x", "temperature": @}', "temperature"),
    ("/v1/completions", '{"prompt": "x", "top_p": @}', "top_p"),
    (
        "/v1/completions",
        '{"prompt": "x", "patch": [{' + SITE + ', "dest_position": 0, "alpha": @}]}',
        "patch.0.alpha",
    ),
    ("/v1/completions", '{"prompt": "x", "steer": [{' + SITE + ', "scale": @}]}', "steer.0.scale"),
    (
        "/v1/steering/modules/register",
        '{"name": "m", "vectors": {"post_block": {"0": {"vector": [1.0, @]}}}}',
        None,
    ),
]
BAD = ["3.5e38", "1" + "0" * 400, "-1e400", "NaN", "Infinity", "-Infinity"]


@pytest.mark.parametrize(("path", "template", "param"), NUMBERS)
def test_numbers_that_reach_torch_are_finite_float32(small, path, template, param):
    with small.client() as c:
        for value in BAD:
            body = template.replace("@", value).encode()
            r = c.post(path, content=body, headers=JSON)
            error = _assert_error(r, 400, param)
            assert "finite" in error["message"], (value, error)


def test_positions_far_past_the_context_are_400s(small: Server):
    with small.client() as c:
        for position in (10**12, 10**400, -(10**12)):  # negative sweep positions count from the end
            patch = {**PATCH, "dest_position": position}
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "patch": [patch]})
            _assert_error(r, 400, "patch.0.dest_position")
            sweep = {"prompt": "x y", "source_module": "zeros", "positions": [position]}
            _assert_error(c.post("/v1/patch_sweep", json=sweep), 400, "positions")


def test_a_missing_or_non_object_body_says_so(small: Server):
    with small.client() as c:
        empty = _assert_error(c.post("/v1/patch_sweep"), 400)
        assert "needs a JSON body" in empty["message"]
        for body in (b"[]", b"null", b"3", b'"x"'):
            r = c.post("/tokenize", content=body, headers=JSON)
            assert "must be a JSON object" in _assert_error(r, 400)["message"]
        broken = c.post("/tokenize", content=b'{"prompt": ', headers=JSON)
        plain = c.post(
            "/tokenize", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"}
        )
        assert "Content-Type: application/json" in _assert_error(plain, 400)["message"]
        assert "not valid JSON" in _assert_error(broken, 400)["message"]


@pytest.fixture(scope="module")
def phi3(checkpoint_root: Path) -> Iterator[Server]:
    """A Phi-3 checkpoint with LongRoPE: exact up to original_max_position_embeddings (64)."""
    srv = start_server(build_checkpoint("phi3", checkpoint_root))
    yield srv
    srv.stop()


def test_a_prompt_past_the_positions_the_model_computes_is_a_400(phi3: Server):
    """Past LongRoPE's 64 positions transformers recomputes every position with other
    factors, which the runtime refuses: a longer prompt is a 400 naming the field on the
    sweep, capture and completion routes (it was a 500), while ``/tokenize`` still counts
    it and a prompt of exactly 64 tokens is served."""
    words = "When Mary and John went to the store, John gave a drink to Mary. " * 8
    with phi3.client() as c:
        ids = c.post("/tokenize", json={"prompt": words}).json()["tokens"]
        assert len(ids) > 64
        fits = c.post("/detokenize", json={"tokens": ids[:64]}).json()["prompt"]
        assert c.post("/tokenize", json={"prompt": fits}).json()["count"] == 64
        sweep = {"prompt": words, "source_module": "zeros", "positions": [0], "layers": [0]}
        for path, body, param in [
            ("/v1/patch_sweep", sweep, "prompt"),
            ("/v1/patch_sweep", {"prompt": "Mary", "clean_prompt": words}, "clean_prompt"),
            ("/v1/patch_source", {"prompt": words, "run": "long"}, "prompt"),
            ("/v1/completions", {"prompt": words, "max_tokens": 1}, "prompt"),
        ]:
            error = _assert_error(c.post(path, json=body), 400, param)
            assert f"{len(ids)} tokens, more than the model's context of 64" in error["message"]
        assert c.post("/v1/patch_source", json={"prompt": fits, "run": "fits"}).status_code == 200
        assert c.post("/v1/patch_sweep", json={**sweep, "prompt": fits}).status_code == 200


def test_a_rotary_model_serves_prompts_past_max_position_embeddings(client):
    """Plain rotary positions have no table to run out of (transformers computes them
    too): the session server's checkpoint (max_position_embeddings 256) captures a longer
    prompt."""
    words = "When Mary and John went to the store, John gave a drink to Mary. " * 30
    assert client.post("/tokenize", json={"prompt": words}).json()["count"] > 256
    r = client.post("/v1/patch_source", json={"prompt": words, "run": "past_256"})
    assert r.status_code == 200, r.text
    client.delete("/v1/patch_source/past_256")
