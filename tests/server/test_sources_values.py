"""``/v1/patch_source`` values against a plain ``transformers`` forward of the checkpoint,
and each documented refusal with its one status and ``param`` (issue 26's mutation check).

The app runs in-process (FastAPI's TestClient on the real ``create_app`` and a real
``ServerState``): the same routes as the loopback server, without its start-up, so the
mutation check's selection for ``server/routes/sources.py`` stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import transformers as tf
from fastapi.testclient import TestClient

from checkpoints import build_checkpoint
from patchserve.server.app import create_app
from patchserve.server.config import ServerConfig
from patchserve.server.state import ServerState
from patchserve.wire.hooks import INJECTABLE_HOOKS
from patchserve.wire.packing import unpack_vectors

CLEAN = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def folder(checkpoint_root):
    return build_checkpoint("qwen3", checkpoint_root)


@pytest.fixture(scope="module")
def app_client(folder, tmp_path_factory) -> Iterator[TestClient]:
    config = ServerConfig(model=str(folder), source_dir=tmp_path_factory.mktemp("runs"))
    with TestClient(create_app(ServerState.from_config(config))) as client:
        yield client


@pytest.fixture(scope="module")
def reference(folder):
    """Token ids, last-position log-softmax (float64) and hidden states of a plain forward."""
    tok = tf.AutoTokenizer.from_pretrained(folder)
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    ids = tok(CLEAN)["input_ids"]
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    last = out.logits[0, -1].double()
    return ids, last, torch.log_softmax(last, -1), out.hidden_states, hf.config.num_hidden_layers


def _error(response, status: int, param: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_graded_and_top_logprobs_match_a_plain_forward(app_client, reference):
    ids, logits, logp, _, _ = reference
    body = app_client.post(
        "/v1/patch_source",
        json={
            "run": "graded",
            "prompt": CLEAN,
            "hooks": {"post_block": [0]},
            "answer_token_id": 5,
            "foil_token_id": 9,
            "logprobs": 4,
            "overwrite": True,
        },
    ).json()
    assert body["token_ids"] == ids and body["num_tokens"] == len(ids)
    graded = body["graded"]
    assert (graded["answer_token_id"], graded["foil_token_id"]) == (5, 9)
    assert graded["logprob"] == pytest.approx(float(logp[5]), abs=1e-4)
    assert graded["logit_diff"] == pytest.approx(float(logits[5] - logits[9]), abs=1e-4)
    top = torch.topk(logp, 4)
    assert [t["token_id"] for t in body["top_logprobs"]] == top.indices.tolist()
    got = [t["logprob"] for t in body["top_logprobs"]]
    assert got == pytest.approx(top.values.tolist(), abs=1e-4)
    assert math.fsum(math.exp(v) for v in logp.tolist()) == pytest.approx(1.0)


def test_graded_without_a_foil_or_an_answer(app_client, reference):
    _, _, logp, _, _ = reference
    body = app_client.post(
        "/v1/patch_source",
        json={"prompt": CLEAN, "hooks": {"post_block": [0]}, "answer_token_id": 7, "logprobs": 0},
    ).json()
    assert body["graded"]["logprob"] == pytest.approx(float(logp[7]), abs=1e-4)
    assert body["graded"].get("logit_diff") is None and body["graded"].get("foil_token_id") is None
    assert body["top_logprobs"] == []
    assert body["run"].startswith("run-")  # a fresh name
    plain = app_client.post("/v1/patch_source", json={"prompt": CLEAN, "hooks": {"mlp_out": [1]}})
    assert "graded" not in plain.json()


def test_default_hooks_are_every_injectable_hook_at_every_layer(app_client, reference):
    _, _, _, _, layers = reference
    body = app_client.post("/v1/patch_source", json={"run": "everything", "prompt": CLEAN}).json()
    assert body["kept"] is True
    assert body["positions"] == list(range(body["num_tokens"]))
    assert set(body["hooks"]) <= set(INJECTABLE_HOOKS) and "post_block" in body["hooks"]
    assert all(v == list(range(layers)) for v in body["hooks"].values())
    assert app_client.delete("/v1/patch_source/everything").status_code == 200


def test_positions_and_activations_round_trip_against_hidden_states(app_client, reference):
    ids, _, _, hidden, _ = reference
    body = app_client.post(
        "/v1/patch_source",
        json={
            "run": "some",
            "prompt": CLEAN,
            "hooks": {"post_block": [0, 1]},
            "positions": [3, 0, 3, len(ids) - 1],
            "overwrite": True,
        },
    ).json()
    assert body["positions"] == [3, 0, len(ids) - 1]
    assert body["hooks"] == {"post_block": [0, 1]}
    for layer in (0, 1):
        got = app_client.get(
            "/v1/patch_source/some",
            params={"include": "activations", "hook": "post_block", "layer": layer},
        ).json()["activations"]
        assert (got["hook"], got["layer"], got["positions"]) == (
            "post_block",
            layer,
            [3, 0, len(ids) - 1],
        )
        expected = hidden[layer + 1][0, [3, 0, len(ids) - 1]].numpy()
        assert np.allclose(unpack_vectors(got), expected, atol=1e-4)
    manifest = app_client.get("/v1/patch_source/some").json()
    assert manifest["run"] == "some" and "activations" not in manifest


def test_listing_dropping_and_the_store_gauge(app_client):
    for name in ("keep-a", "keep-b"):
        app_client.post(
            "/v1/patch_source",
            json={"run": name, "prompt": CLEAN, "hooks": {"post_block": [0]}, "overwrite": True},
        )
    names = [m["run"] for m in app_client.get("/v1/patch_source").json()["data"]]
    assert {"keep-a", "keep-b"} <= set(names)

    def stored() -> float:
        text = app_client.get("/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("patchserve_store_runs "))
        return float(line.split()[1])

    assert stored() == len(names)
    assert app_client.delete("/v1/patch_source/keep-a").json()["run"] == "keep-a"
    assert stored() == len(names) - 1
    names = [m["run"] for m in app_client.get("/v1/patch_source").json()["data"]]
    assert "keep-a" not in names and "keep-b" in names
    _error(app_client.delete("/v1/patch_source/keep-a"), 404, "run")
    _error(app_client.get("/v1/patch_source/keep-a"), 404, "run")


def test_overwrite_and_conflict(app_client):
    first = {"run": "twice", "prompt": CLEAN, "hooks": {"post_block": [0]}}
    app_client.post("/v1/patch_source", json={**first, "overwrite": True})
    _error(app_client.post("/v1/patch_source", json=first), 409, "run")
    again = app_client.post(
        "/v1/patch_source", json={**first, "hooks": {"mlp_out": [1]}, "overwrite": True}
    )
    assert again.status_code == 200 and again.json()["hooks"] == {"mlp_out": [1]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"hooks": {}}, "hooks"),
        ({"hooks": {"post_block": [3]}}, "hooks"),
        ({"hooks": {"post_block": [-4]}}, "hooks"),
        ({"positions": []}, "positions"),
        ({"positions": [-1]}, "positions"),
        ({"run": "a/b"}, "run"),
    ],
)
def test_bad_captures_are_a_400_naming_the_field(app_client, body, param):
    _error(app_client.post("/v1/patch_source", json={"prompt": CLEAN, **body}), 400, param)


def test_the_last_position_can_be_captured_and_the_next_cannot(app_client, reference):
    ids, _, _, _, _ = reference
    past = {"prompt": CLEAN, "hooks": {"post_block": [2]}, "positions": [0, len(ids)]}
    _error(app_client.post("/v1/patch_source", json=past), 400, "positions")
    body = app_client.post(
        "/v1/patch_source",
        json={"prompt": CLEAN, "hooks": {"post_block": [2]}, "positions": [len(ids) - 1, 0]},
    )
    assert body.status_code == 200 and body.json()["positions"] == [len(ids) - 1, 0]


def test_activation_requests_that_cannot_be_answered(app_client):
    app_client.post(
        "/v1/patch_source",
        json={"run": "one", "prompt": CLEAN, "hooks": {"post_block": [0]}, "overwrite": True},
    )
    url = "/v1/patch_source/one"
    _error(app_client.get(url, params={"include": "activations", "layer": 0}), 400, "hook")
    _error(
        app_client.get(url, params={"include": "activations", "hook": "post_block"}), 400, "hook"
    )
    missing = {"include": "activations", "hook": "post_block", "layer": 1}
    _error(app_client.get(url, params=missing), 404, "hook")
    _error(app_client.get("/v1/patch_source/nope", params=missing), 404, "run")


def test_another_model_and_bad_run_names_in_the_path_are_refused(app_client):
    unknown = app_client.post("/v1/patch_source", json={"prompt": CLEAN, "model": "gpt-x"})
    _error(unknown, 404, "model")
    assert unknown.json()["error"]["type"] == "model_not_found"
    _error(app_client.get("/v1/patch_source/a..b"), 400, "run")
    _error(app_client.delete("/v1/patch_source/a..b"), 400, "run")


def test_hooks_the_runtime_does_not_offer_are_refused_and_left_out(checkpoint_root, tmp_path):
    llama = build_checkpoint("llama", checkpoint_root)
    config = ServerConfig(model=str(llama), runtime="transformers", source_dir=tmp_path)
    with TestClient(create_app(ServerState.from_config(config))) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["runtime"] == "transformers" and "post_attn" not in card["hooks"]
        refused = client.post(
            "/v1/patch_source", json={"prompt": CLEAN, "hooks": {"post_attn": [0]}}
        )
        _error(refused, 400, "hooks")
        body = client.post("/v1/patch_source", json={"run": "offered", "prompt": CLEAN}).json()
        assert set(body["hooks"]) == set(card["hooks"]) & set(INJECTABLE_HOOKS)


def test_position_errors_say_which(app_client):
    empty = app_client.post("/v1/patch_source", json={"prompt": CLEAN, "positions": []})
    _error(empty, 400, "positions")
    assert empty.json()["error"]["message"] == "positions is empty"
    past = app_client.post("/v1/patch_source", json={"prompt": CLEAN, "positions": [0, 99, -2]})
    _error(past, 400, "positions")
    assert past.json()["error"]["message"].startswith("positions [99, -2] are out of range")


def test_a_run_dropped_between_manifest_and_read_is_a_404(app_client, monkeypatch):
    app_client.post(
        "/v1/patch_source",
        json={"run": "racy", "prompt": CLEAN, "hooks": {"post_block": [0]}, "overwrite": True},
    )
    store = app_client.app.state.patchserve.store
    monkeypatch.setattr(store, "get", lambda name: None)  # dropped after the manifest was read
    params = {"include": "activations", "hook": "post_block", "layer": 0}
    _error(app_client.get("/v1/patch_source/racy", params=params), 404, "run")
