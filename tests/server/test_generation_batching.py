"""Continuous batching over a real server: concurrent requests decode together yet each
gets its own interventions, and a streaming client that leaves stops its rows."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx

from models.helpers import loaded

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital",
    "One two three four five six seven eight",
    "Hi",
]


def _metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def _body(width: int, layer: int, scale: float, hook: str, **extra) -> dict:
    return {
        "prompt": PROMPTS,
        "temperature": 0,
        "logprobs": 2,
        "logprob_token_ids": [5, 9],
        "steer": [{"layer": layer, "hook": hook, "source_inline": 0, "scale": scale}],
        "patch": [{"layer": 0, "hook": "mlp_out", "dest_position": 3, "source_inline": 0}],
        "patch_vectors": {"dtype": "float32", "shape": [1, width], "data": _vector(width)},
        **extra,
    }


def _vector(width: int) -> str:
    import base64

    import numpy as np

    return base64.b64encode(np.linspace(-2, 2, width, dtype=np.float32).tobytes()).decode()


def _same_choices(got: dict, alone: dict) -> None:
    for a, b in zip(got["choices"], alone["choices"], strict=True):
        assert a["token_ids"] == b["token_ids"]
        assert a["text"] == b["text"]
        lps = zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"], strict=True)
        for x, y in lps:
            assert abs(x - y) < 1e-5
        for x, y in zip(a["logprob_token_ids"], b["logprob_token_ids"], strict=True):
            assert all(abs(x[k] - y[k]) < 1e-5 for k in x)


def test_concurrent_requests_with_different_interventions_equal_each_alone(client, server):
    width = loaded(server.folder).model.cfg.hidden_size
    long = _body(width, 1, 4.0, "post_block", max_tokens=60)
    short = _body(width, 0, -6.0, "pre_attn", max_tokens=20)
    alone = [client.post("/v1/completions", json=b).json() for b in (long, short)]
    steps = _metric(client, "patchserve_generation_steps")
    got: dict[int, dict] = {}

    def send(i: int, body: dict) -> None:
        with server.client() as c:
            got[i] = c.post("/v1/completions", json=body).json()

    first = threading.Thread(target=send, args=(0, long))
    first.start()
    while _metric(client, "patchserve_generation_steps") == steps:  # the long one decodes
        time.sleep(0.005)
    send(1, short)  # joins the running batch
    first.join(120)
    _same_choices(got[0], alone[0])
    _same_choices(got[1], alone[1])
    # shared: fewer decoding passes than the two requests run one after the other
    assert _metric(client, "patchserve_generation_steps") - steps < 60 + 20 - 1


def test_a_streaming_client_that_leaves_stops_its_rows(client, server):
    max_tokens = 200  # within the test model's context of 256 with these short prompts
    prompts = ["The capital", "Hi", "One two", "Yes"] * 4
    body = {"prompt": prompts, "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
    body["seed"] = 1
    before = _metric(client, "patchserve_generation_steps")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:  # a client that just leaves
        payload = httpx.Request("POST", f"{server.url}/v1/completions", json=body)
        head = "".join(f"{k}: {v}\r\n" for k, v in payload.headers.items())
        raw.sendall(f"POST /v1/completions HTTP/1.1\r\n{head}\r\n".encode() + payload.read())
        received = b""
        while b"data: {" not in received:  # the first chunk: decoding has started
            chunk = raw.recv(65536)
            assert chunk, received
            received += chunk
        assert _metric(client, "patchserve_generation_rows") > 0
    deadline = time.time() + 30
    while _metric(client, "patchserve_generation_rows") != 0:  # the rows left the batch
        assert time.time() < deadline, "the rows kept decoding after the client left"
        time.sleep(0.01)
    stopped = _metric(client, "patchserve_generation_steps")
    assert stopped - before < max_tokens // 2  # stopped early, not at max_tokens
    time.sleep(0.3)
    assert _metric(client, "patchserve_generation_steps") == stopped  # nothing decodes now
    # the next request runs at once, alone in the batch
    body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0}
    made = client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]
    assert _metric(client, "patchserve_generation_steps") == stopped + made - 1
