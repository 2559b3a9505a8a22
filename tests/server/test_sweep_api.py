"""/v1/patch_sweep over a real server process: exactness, streaming, auto-capture, errors."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from models.helpers import loaded, tokenizer
from patchserve.engine import capture_run, prepare_sweep, run_sweep
from patchserve.models import INJECTABLE_HOOKS
from patchserve.wire.packing import pack_vectors

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def local_grid(folder, **kwargs):
    model, tok = loaded(folder).model, tokenizer(folder)
    n = model.cfg.num_layers
    ids = tok.encode(CLEAN).ids
    run = capture_run(model, "local", CLEAN, ids, {h: list(range(n)) for h in INJECTABLE_HOOKS})
    spec, _ = prepare_sweep(model, tok, prompt=CORRUPT, source=run, **kwargs)
    return run_sweep(model, spec)


def test_grid_over_http_equals_the_in_process_engine_bit_for_bit(client, server):
    body = client.post(
        "/v1/patch_sweep",
        json={
            "prompt": CORRUPT,
            "clean_prompt": CLEAN,
            "metric": "logit_diff",
            "answer_token_id": 5,
            "foil_token_id": 9,
            "hooks": ["post_block", "attn_out"],
        },
    ).json()
    outcome = local_grid(
        server.folder,
        metric="logit_diff",
        answer_token_id=5,
        foil_token_id=9,
        hooks=["post_block", "attn_out"],
    )
    assert body["grid"] == outcome.grids["post_block"]
    assert [g["grid"] for g in body["hook_grids"]] == [
        outcome.grids["post_block"],
        outcome.grids["attn_out"],
    ]
    assert body["corrupt"] == outcome.corrupt and body["clean"] == outcome.clean
    assert body["auto_captured"] is True
    assert len(body["tokens"]) == len(body["positions"])


def test_multi_token_head_sweep_over_http_equals_the_engine(client, server):
    """A (layer, head) grid graded on a two-token answer: the body, the stream's cells and
    the in-process engine agree bit for bit, and the answer's ids are reported."""
    request = {
        "prompt": CORRUPT,
        "clean_prompt": CLEAN,
        "metric": "logit_diff",
        "answer_token_id": [5, 6],
        "foil_token": " John gave",
        "hook": "attn_head",
        "heads": "all",
        "per_position": False,
    }
    body = client.post("/v1/patch_sweep", json=request).json()
    kwargs = {k: v for k, v in request.items() if k not in ("prompt", "clean_prompt")}
    outcome = local_grid(server.folder, **{**kwargs, "foil_token": " John gave"})
    assert body["grid"] == outcome.grids["attn_head"] and body["per_position"] is False
    assert body["answer_token_ids"] == [5, 6] and body["answer_token_id"] == 5
    assert body["foil_token_ids"] == outcome.foil_ids and len(outcome.foil_ids) > 1
    assert body["corrupt"] == outcome.corrupt and body["clean"] == outcome.clean
    assert "position" not in body["argmax"] and body["argmax"]["head"] is not None
    with client.stream("POST", "/v1/patch_sweep", json={**request, "stream": True}) as response:
        events = sse_events(response)
    cells = [e for e in events if isinstance(e, dict) and e["type"] == "cell"]
    assert events[0]["per_position"] is False and len(cells) == events[0]["total"]
    assert all("position" not in c for c in cells)
    assert {(c["layer"], c["head"]): c["value"] for c in cells} == {
        (layer, head): outcome.grids["attn_head"][i][k]
        for i, layer in enumerate(outcome.layers)
        for k, head in enumerate(outcome.heads)
    }


def test_auto_captured_run_is_dropped_and_kept_one_is_listed(client):
    body = client.post(
        "/v1/patch_sweep", json={"prompt": CORRUPT, "clean_prompt": CLEAN, "layers": [0]}
    ).json()
    assert body["auto_captured"] and body["captured_source_run"]
    assert client.get(f"/v1/patch_source/{body['captured_source_run']}").status_code == 404
    kept = client.post(
        "/v1/patch_sweep",
        json={
            "prompt": CORRUPT,
            "clean_prompt": CLEAN,
            "layers": [0],
            "keep_source": True,
            "source_run": "kept-run",
        },
    ).json()
    assert kept["captured_source_run"] == "kept-run"
    names = [m["run"] for m in client.get("/v1/patch_source").json()["data"]]
    assert "kept-run" in names
    # An existing run is reused, never re-captured or dropped.
    again = client.post(
        "/v1/patch_sweep", json={"prompt": CORRUPT, "source_run": "kept-run", "layers": [0]}
    ).json()
    assert again["auto_captured"] is False and again["grid"] == kept["grid"]
    assert client.get("/v1/patch_source/kept-run").status_code == 200
    assert client.delete("/v1/patch_source/kept-run").json() == {
        "run": "kept-run",
        "object": "patch_source",
        "dropped": True,
    }
    assert client.get("/v1/patch_source/kept-run").status_code == 404
    assert client.delete("/v1/patch_source/kept-run").status_code == 404


def test_streamed_summary_equals_the_plain_body(client):
    client.post("/v1/patch_source", json={"run": "stream-src", "prompt": CLEAN, "overwrite": True})
    request = {
        "prompt": CORRUPT,
        "source_run": "stream-src",
        "hooks": ["mlp_out", "attn_head"],
        "heads": [0, 3],
        "metric": "prob",
    }
    plain = client.post("/v1/patch_sweep", json=request).json()
    with client.stream("POST", "/v1/patch_sweep", json={**request, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    start, cells, summary, done = events[0], events[1:-2], events[-2], events[-1]
    assert start["type"] == "start" and done == "[DONE]"
    assert len(cells) == start["total"]
    assert len({(c["hook"], c["layer"], c["position"], c.get("head")) for c in cells}) == len(cells)
    assert summary.pop("type") == "summary"
    summary.pop("timing")
    plain.pop("timing")
    assert summary == plain
    assert np.array(plain["hook_grids"][1]["grid"]).shape == (3, len(plain["positions"]), 2)


def test_vector_sweep_with_packed_vectors_and_masks(client, server):
    model = loaded(server.folder).model
    d = model.cfg.hidden_size
    rng = np.random.default_rng(0)
    table = np.stack([rng.normal(size=d), (rng.random(d) > 0.5).astype(np.float32)])
    body = client.post(
        "/v1/patch_sweep",
        json={
            "prompt": CORRUPT,
            "source_inline": 0,
            "patch_vectors": pack_vectors(table),
            "mask": {"inline": 1},
            "alpha": 0.5,
            "hook": "post_attn",
            "metric": "kl",
        },
    ).json()
    tok = tokenizer(server.folder)
    from patchserve.engine import VectorSource

    vec = torch.from_numpy(table[0].astype(np.float32))
    spec, _ = prepare_sweep(
        model,
        tok,
        prompt=CORRUPT,
        source=VectorSource("inline", lambda hook, layer: vec),
        hook="post_attn",
        alpha=0.5,
        masks=torch.from_numpy(table[1].astype(np.float32)),
        metric="kl",
    )
    assert body["grid"] == run_sweep(model, spec).grids["post_attn"]
    zeros = client.post(
        "/v1/patch_sweep",
        json={
            "prompt": CORRUPT,
            "source_module": "zeros",
            "hook": "mlp_out",
            "mask": {"indices": [0, 3]},
        },
    )
    assert zeros.status_code == 200


def test_spans_resolve_server_side(client, server):
    body = client.post(
        "/v1/patch_sweep",
        json={
            "prompt": CORRUPT,
            "clean_prompt": CLEAN,
            "layers": [0],
            "positions": [{"span": "John", "occurrence": 1}, 2, {"span": "Mari"}],
        },
    ).json()
    tok = tokenizer(server.folder)
    enc = tok.encode(CORRUPT)
    second_john = CORRUPT.index("John", CORRUPT.index("John") + 1)
    john = [i for i, (a, b) in enumerate(enc.offsets) if a < second_john + 4 and b > second_john]
    assert body["positions"][: len(john)] == john
    assert 2 in body["positions"]


def test_a_string_answer_of_several_tokens_is_graded_with_a_warning_naming_them(client, server):
    """A character the vocabulary lacks ("\ufffd") becomes three byte tokens: the sweep grades
    them as a continuation and says so, with the ids and each token's string."""
    from tokenizers import Tokenizer as RawTokenizer  # the tokenizer file itself, not ours

    raw = RawTokenizer.from_file(str(server.folder / "tokenizer.json"))
    sweep = {"prompt": CORRUPT, "clean_prompt": CLEAN, "layers": [0]}
    replaced = raw.encode("\ufffd", add_special_tokens=False).ids
    assert len(replaced) == 3
    body = client.post("/v1/patch_sweep", json={**sweep, "answer_token": "\ufffd"}).json()
    assert body["answer_token_ids"] == replaced
    pieces = ", ".join(repr(raw.decode([i])) for i in replaced)
    assert [w for w in body["warnings"] if "continuation" in w] == [
        f"answer_token '\ufffd' is 3 tokens {replaced} ({pieces}): graded as a continuation, "
        "their teacher-forced total log-probability"
    ]
    # Without its leading space a word may be several tokens and one with it: both are said.
    spaced = raw.encode(" the", add_special_tokens=False).ids
    bare = raw.encode("the", add_special_tokens=False).ids
    assert len(spaced) == 1 and len(bare) > 1
    body = client.post("/v1/patch_sweep", json={**sweep, "foil_token": "the"}).json()
    (warning,) = [w for w in body["warnings"] if "continuation" in w]
    assert warning.startswith(f"foil_token 'the' is {len(bare)} tokens {bare} (")
    assert warning.endswith(f"; ' the' is one token (id {spaced[0]}) — did you mean it?")
    # One token, or ids given as a list, are what was asked for: no warning.
    one = client.post("/v1/patch_sweep", json={**sweep, "answer_token": " Jo"}).json()
    ids = client.post("/v1/patch_sweep", json={**sweep, "answer_token_id": replaced}).json()
    assert one["warnings"] == [] and ids["warnings"] == []


def test_six_concurrent_sweeps_match_the_sweep_alone(server):
    request = {
        "prompt": CORRUPT,
        "clean_prompt": CLEAN,
        "hooks": ["post_block", "mlp_in"],
        "metric": "logprob",
    }
    with server.client() as c:
        alone = c.post("/v1/patch_sweep", json=request).json()
    results: list = [None] * 6

    def worker(i: int) -> None:
        with server.client() as c:
            results[i] = c.post("/v1/patch_sweep", json=request).json()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for body in results:
        assert body["hook_grids"] == alone["hook_grids"]
        assert body["noise_floor"] == alone["noise_floor"]


def test_a_dropped_stream_frees_the_engine_and_drops_its_run(server):
    with server.client() as c:
        big = {
            "prompt": CORRUPT * 4,
            "clean_prompt": CLEAN * 4,
            "hooks": list(INJECTABLE_HOOKS),
            "heads": "all",
            "stream": True,
            "source_run": "dropped-stream",
        }
        with c.stream("POST", "/v1/patch_sweep", json=big) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and '"type": "cell"' in line:
                    break  # the client goes away mid-sweep
        started = time.time()
        small = c.post(
            "/v1/patch_sweep", json={"prompt": CORRUPT, "clean_prompt": CLEAN, "layers": [0]}
        )
        assert small.status_code == 200
        assert time.time() - started < 5
        deadline = time.time() + 5
        while c.get("/v1/patch_source/dropped-stream").status_code != 404:
            assert time.time() < deadline, "the auto-captured run survived the disconnect"
            time.sleep(0.1)


BAD_REQUESTS = [
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "positions": [{"span": ""}]}, "positions", "empty"),
    (
        {"prompt": CORRUPT, "clean_prompt": CLEAN, "positions": [{"span": "Paris"}]},
        "positions",
        "not found",
    ),
    (
        {
            "prompt": CORRUPT,
            "clean_prompt": CLEAN,
            "positions": [{"span": "John", "occurrence": 5}],
        },
        "positions",
        "out of range",
    ),
    ({"prompt": CORRUPT, "source_run": "no-such-run"}, "source_run", "not found"),
    ({"prompt": CORRUPT}, "clean_prompt", "no source"),
    ({"prompt": CORRUPT, "source_module": "nope"}, "source_module", "unknown module"),
    (
        {"prompt": CORRUPT, "source_module": "zeros", "metric": "recovered"},
        "clean_baseline",
        "recovered",
    ),
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "answer_token": ""}, "answer_token", "non-empty"),
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "answer_token_id": []}, "answer_token_id", "empty"),
    (
        {"prompt": CORRUPT, "clean_prompt": CLEAN, "answer_token": " John gave", "metric": "kl"},
        "metric",
        "multi-token",
    ),
    (
        {"prompt": CORRUPT, "clean_prompt": CLEAN, "per_position": False},
        "per_position",
        "attn_head",
    ),
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "layers": [7]}, "layers", "out of range"),
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "positions": [999]}, "positions", "out of range"),
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "hook": "resid"}, "hook", "unknown hook"),
    (
        {
            "prompt": CORRUPT,
            "source_inline": 0,
            "patch_vectors": {"dtype": "float32", "shape": [1, 64], "data": "!!"},
        },
        "patch_vectors",
        "base64",
    ),
    (
        {
            "prompt": CORRUPT,
            "source_inline": 0,
            "patch_vectors": {"dtype": "float32", "shape": [1, 64], "data": "AAAA"},
        },
        "patch_vectors",
        "bytes",
    ),
    (
        {"prompt": CORRUPT, "source_inline": 0, "patch_vectors": pack_vectors(np.zeros((1, 7)))},
        "source_inline",
        "wide",
    ),
    ({"prompt": CORRUPT, "source_run": "../etc/passwd"}, "source_run", "invalid run name"),
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "metric": "accuracy"}, "metric", "unknown metric"),
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "heads": [0]}, "heads", "attn_head"),
    (
        {"prompt": CORRUPT, "clean_prompt": CLEAN, "hook": "attn_head", "heads": [9]},
        "heads",
        "out of range",
    ),
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "alpha": "x"}, "alpha", ""),
    ({"prompt": CORRUPT, "clean_prompt": CLEAN, "layer": [0]}, "layer", "unknown field"),
    ({"clean_prompt": CLEAN}, "prompt", "missing"),
]


@pytest.mark.parametrize(("request_body", "param", "words"), BAD_REQUESTS)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_are_clear_json_4xx(client, request_body, param, words, stream):
    response = client.post("/v1/patch_sweep", json={**request_body, "stream": stream})
    # docs/api.md: every bad item, a run or module the body names that does not exist
    # included, is a 400 (404 is for the path's run and an unknown `model`)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == response.status_code
    assert error["param"] == param
    assert words.lower() in error["message"].lower()


def test_recovered_with_equal_prompts_is_a_400(client):
    response = client.post(
        "/v1/patch_sweep", json={"prompt": CLEAN, "clean_prompt": CLEAN, "metric": "recovered"}
    )
    assert response.status_code == 400
    assert "divide by zero" in response.json()["error"]["message"]


def test_malformed_json_is_a_400(client):
    response = client.post(
        "/v1/patch_sweep", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]
