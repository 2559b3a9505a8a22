"""Where the seed server's behaviour is the contract (issue: one owner for the wire format).

Each test pins one behaviour measured against the seed server, over a real
server process on the tiny Qwen3 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"
# A corrupt prompt of another length: its differing middle has no clean partner.
LONGER = "When Mari Anne Lou and John went to the store, John gave a drink to"


def sweep(client, **body):
    return client.post("/v1/patch_sweep", json=body)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    return error


def test_missing_source_run_without_clean_prompt_is_a_400(client):
    error = error_of(sweep(client, prompt=CORRUPT, source_run="never-captured"), 400)
    assert error["param"] == "source_run" and "not found" in error["message"]
    assert error["type"] == "invalid_request_error"
    patch = {
        "layer": 0,
        "hook": "post_block",
        "dest_position": 1,
        "source_run": "never-captured",
        "source_position": 1,
    }
    completion = client.post(
        "/v1/completions", json={"prompt": CORRUPT, "max_tokens": 1, "patch": [patch]}
    )
    error = error_of(completion, 400)
    assert error["param"] == "patch.0" and "not found" in error["message"]


@pytest.mark.parametrize("foil", [None, 9])
def test_recovered_reports_raw_clean_and_corrupt(client, foil):
    common = {"prompt": CORRUPT, "clean_prompt": CLEAN, "answer_token_id": 5, "layers": [0, 1]}
    if foil is not None:
        common["foil_token_id"] = foil
    raw_metric = "logprob" if foil is None else "logit_diff"
    raw = sweep(client, **common, metric=raw_metric).json()
    recovered = sweep(client, **common, metric="recovered").json()
    assert recovered["clean"] == pytest.approx(raw["clean"], abs=1e-9)
    assert recovered["corrupt"] == pytest.approx(raw["corrupt"], abs=1e-9)
    assert recovered["clean"] != 1.0 and recovered["corrupt"] != 0.0
    expected = (np.array(raw["grid"]) - raw["corrupt"]) / (raw["clean"] - raw["corrupt"])
    np.testing.assert_allclose(np.array(recovered["grid"]), expected, atol=1e-9)
    assert 0 <= recovered["noise_floor"] < 1e-3  # in recovered units


def test_hook_grids_whenever_hooks_was_used(client):
    one = sweep(client, prompt=CORRUPT, clean_prompt=CLEAN, hooks=["mlp_out"], layers=[0]).json()
    assert [g["hook"] for g in one["hook_grids"]] == ["mlp_out"]
    assert one["hook_grids"][0]["grid"] == one["grid"]
    assert one["hook_grids"][0]["argmax"] == one["argmax"]
    plain = sweep(client, prompt=CORRUPT, clean_prompt=CLEAN, hook="mlp_out", layers=[0]).json()
    assert "hook_grids" in plain and plain["hook_grids"] is None


def test_alignment_carries_the_seed_fields(client):
    body = sweep(client, prompt=LONGER, clean_prompt=CLEAN, layers=[0]).json()
    alignment = body["alignment"]
    clean_ids = client.post("/tokenize", json={"prompt": CLEAN}).json()["tokens"]
    corrupt_ids = client.post("/tokenize", json={"prompt": LONGER}).json()["tokens"]
    pairs = zip(clean_ids, corrupt_ids, strict=False)
    prefix = next(i for i, (a, b) in enumerate(pairs) if a != b)
    tails = zip(reversed(clean_ids), reversed(corrupt_ids), strict=False)
    suffix = next(i for i, (a, b) in enumerate(tails) if a != b)
    assert alignment == {
        "n_clean": len(clean_ids),
        "n_corrupt": len(corrupt_ids),
        "prefix_len": prefix,
        "suffix_len": suffix,
        "unaligned_positions": list(range(prefix, len(corrupt_ids) - suffix)),
        "mode": "prefix_suffix",
        "shift": len(clean_ids) - len(corrupt_ids),
        "differing_positions": list(range(prefix, len(corrupt_ids) - suffix)),
    }
    same = sweep(client, prompt=CORRUPT, clean_prompt=CLEAN, layers=[0]).json()["alignment"]
    same_ids = client.post("/tokenize", json={"prompt": CORRUPT}).json()["tokens"]
    n = len(clean_ids)
    assert same == {
        "n_clean": n,
        "n_corrupt": n,
        "prefix_len": n,
        "suffix_len": 0,
        "unaligned_positions": [],
        "mode": "positional",
        "shift": 0,
        "differing_positions": [i for i in range(n) if clean_ids[i] != same_ids[i]],
    }


@pytest.mark.parametrize("stream", [False, True])
def test_no_alignable_position_is_a_400(client, stream):
    unaligned = sweep(client, prompt=LONGER, clean_prompt=CLEAN, layers=[0]).json()["alignment"][
        "unaligned_positions"
    ]
    body = {"prompt": LONGER, "layers": [0], "positions": unaligned, "stream": stream}
    error = error_of(sweep(client, **body, clean_prompt=CLEAN), 400)
    assert "no alignable positions" in error["message"] and error["param"] == "positions"
    client.post("/v1/patch_source", json={"run": "seed-align", "prompt": CLEAN, "overwrite": True})
    error = error_of(sweep(client, **body, source_run="seed-align"), 400)
    assert "no alignable positions" in error["message"]
    # One alignable position among them is enough: the rest are skipped and listed.
    ok = sweep(client, prompt=LONGER, clean_prompt=CLEAN, layers=[0], positions=[*unaligned, 0])
    assert ok.status_code == 200 and len(ok.json()["skipped"]) == len(unaligned)


@pytest.mark.parametrize("source", [{"source_module": "zeros"}, {"source_inline": 0}])
def test_clean_prompt_with_a_vector_source_is_a_400(client, source):
    error = error_of(sweep(client, prompt=CORRUPT, clean_prompt=CLEAN, **source), 400)
    assert error["param"] == "clean_prompt"


def test_a_module_needs_vectors_only_at_the_swept_layers(client, server):
    width = client.get("/v1/models").json()["data"][0]["hidden_size"]
    vectors = {"mlp_out": {"1": {"vector": [0.5] * width}}}
    registered = client.post(
        "/v1/steering/modules/register",
        json={"name": "seed-layer1", "vectors": vectors, "overwrite": True},
    )
    assert registered.status_code == 200
    ok = sweep(client, prompt=CORRUPT, source_module="seed-layer1", hook="mlp_out", layers=[1])
    assert ok.status_code == 200 and len(ok.json()["grid"]) == 1
    error = error_of(
        sweep(client, prompt=CORRUPT, source_module="seed-layer1", hook="mlp_out", layers=[0, 1]),
        400,
    )
    assert "layer 0" in error["message"] and error["param"] == "source_module"


def test_logprob_token_ids_are_what_top_logprobs_lists(client):
    vocab = client.get("/v1/models").json()["data"][0]["vocab_size"]
    body = {"prompt": CORRUPT, "max_tokens": 1, "temperature": 0, "logprobs": 1}
    every = client.post("/v1/completions", json={**body, "logprob_token_ids": list(range(vocab))})
    exact = every.json()["choices"][0]["logprob_token_ids"][0]
    ranked = sorted(range(vocab), key=lambda i: exact[str(i)])

    def text(token_id: int) -> str:
        return client.post("/detokenize", json={"tokens": [token_id]}).json()["prompt"]

    # The two least likely ids that decode to plain words (byte tokens share one string).
    requested = [i for i in ranked if text(i).strip().isalpha()][:2]
    out = client.post("/v1/completions", json={**body, "logprob_token_ids": requested}).json()
    choice = out["choices"][0]
    top = choice["logprobs"]["top_logprobs"][0]
    names = [text(i) for i in requested]
    assert len(set(names)) == 2 and exact[str(requested[1])] < exact[str(ranked[-1])]
    # In place of the top-1: the requested ids, plus the chosen token (as vLLM lists it).
    assert set(top) == {*names, choice["logprobs"]["tokens"][0]}
    for name, token_id in zip(names, requested, strict=True):
        assert top[name] == pytest.approx(exact[str(token_id)], abs=1e-6)
        assert top[name] == pytest.approx(choice["logprob_token_ids"][0][str(token_id)], abs=1e-6)
    without = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert set(without["top_logprobs"][0]) == {without["tokens"][0]}  # top-1 = the chosen one


def test_stream_start_event_names_the_first_hook(client):
    body = {"prompt": CORRUPT, "clean_prompt": CLEAN, "hooks": ["mlp_out", "attn_out"]}
    with client.stream(
        "POST", "/v1/patch_sweep", json={**body, "layers": [0], "stream": True}
    ) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    start = json.loads(first[len("data: ") :])
    assert start["type"] == "start" and start["hook"] == "mlp_out"
    assert start["hooks"] == ["mlp_out", "attn_out"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/patch_sweep", {"prompt": CORRUPT, "clean_prompt": CLEAN, "layers": [0]}),
        ("/v1/patch_source", {"prompt": CLEAN, "run": "seed-model", "overwrite": True}),
        ("/v1/completions", {"prompt": CORRUPT, "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/tokenize", {"prompt": CLEAN}),
        ("/detokenize", {"tokens": [1, 2]}),
    ],
)
def test_an_unknown_model_name_is_a_404_model_not_found(client, path, body):
    error = error_of(client.post(path, json={**body, "model": "nope"}), 404)
    assert error["type"] == "model_not_found" and error["param"] == "model"
    served = client.get("/v1/models").json()["data"][0]["id"]
    assert client.post(path, json={**body, "model": served}).status_code == 200
    assert client.post(path, json=body).status_code == 200


def test_a_multi_token_answer_is_graded_where_the_seed_answers_400_as_documented(client):
    """A deliberate difference (docs/api.md §4): the seed refuses a string answer of several
    tokens; patchserve grades the continuation and warns."""
    body = sweep(client, prompt=CORRUPT, clean_prompt=CLEAN, answer_token=" John gave", layers=[0])
    assert body.status_code == 200, body.text
    assert len(body.json()["answer_token_ids"]) > 1
    assert any("graded as a continuation" in w for w in body.json()["warnings"])
    api = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    differences = api.split("## 4. Differences from the seed server")[1]
    assert "**Multi-token answers**" in differences and "answers 400" in differences
