"""Tokenizer routes, models, health, metrics, named vectors, auth and limits."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_server
from models.helpers import tokenizer
from patchserve.wire.packing import pack_vectors

CLEAN = "When Mary and John went to the store, John gave a drink to"


def test_tokenize_and_detokenize_round_trip(client, server):
    body = client.post("/tokenize", json={"prompt": CLEAN}).json()
    enc = tokenizer(server.folder).encode(CLEAN)
    assert body["tokens"] == enc.ids and len(body["offsets"]) == len(enc.ids)
    assert "".join(body["token_strs"]) == CLEAN
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": CLEAN}
    bad = client.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def _samples(client) -> dict[str, float]:
    """Every sample of /metrics, by name (labelled samples summed over their labels)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def test_models_health_and_metrics(client):
    model = client.get("/v1/models").json()["data"][0]
    assert model["architecture"] == "Qwen3ForCausalLM" and model["num_layers"] == 3
    assert client.get("/health").json()["status"] == "ok"
    before = _samples(client)
    for name in (
        "patchserve_requests_total",
        "patchserve_sweeps_total",
        "patchserve_cells_total",
        "patchserve_cells_per_second",
        "patchserve_queue_depth",
        "patchserve_store_bytes",
    ):
        assert name in before
    tokens = len(client.post("/tokenize", json={"prompt": CLEAN}).json()["tokens"])
    sweep = {"prompt": CLEAN, "source_module": "zeros", "layers": [0, 2]}
    assert client.post("/v1/patch_sweep", json=sweep).status_code == 200
    after = _samples(client)
    # the counters moved by exactly this sweep: one sweep of 2 layers x every position
    assert after["patchserve_sweeps_total"] - before["patchserve_sweeps_total"] == 1
    assert after["patchserve_cells_total"] - before["patchserve_cells_total"] == 2 * tokens
    assert after["patchserve_requests_total"] - before["patchserve_requests_total"] >= 2
    assert client.get("/openapi.json").json()["paths"]["/v1/patch_sweep"]


def test_named_vectors_register_use_and_delete(client):
    d = 64
    vec = np.linspace(-1, 1, d).tolist()
    body = {
        "name": "dir",
        "vectors": {
            "post_block": {
                "0": {"vector": vec, "scale": 2.0},
                "1": {"vector": pack_vectors(np.ones((1, d)))},
                "2": {"vector": vec},
            }
        },
    }
    assert client.post("/v1/steering/modules/register", json=body).json()["registered"] == 3
    assert client.post("/v1/steering/modules/register", json=body).status_code == 409
    names = [m["name"] for m in client.get("/v1/steering/modules").json()["data"]]
    assert names[:2] == ["zeros", "dir"]
    sweep = client.post("/v1/patch_sweep", json={"prompt": CLEAN, "source_module": "dir"})
    assert sweep.status_code == 200
    # the registered scale applies: layer 0's (scale 2) grid is that of the inline 2·v
    by_module = client.post(
        "/v1/patch_sweep", json={"prompt": CLEAN, "source_module": "dir", "layers": [0, 2]}
    ).json()["grid"]
    twice, once = (
        client.post(
            "/v1/patch_sweep",
            json={
                "prompt": CLEAN,
                "source_inline": 0,
                "patch_vectors": pack_vectors(np.asarray([k * np.linspace(-1, 1, d)], "float32")),
                "layers": [0, 2],
            },
        ).json()["grid"]
        for k in (2.0, 1.0)
    )
    assert by_module[0] == twice[0] and by_module[1] == once[1]
    assert twice[0] != once[0]
    missing = client.post(
        "/v1/patch_sweep", json={"prompt": CLEAN, "source_module": "dir", "hook": "mlp_out"}
    )
    assert missing.status_code == 400 and "no vector" in missing.json()["error"]["message"]
    assert client.delete("/v1/steering/modules/dir").json()["deleted"] is True
    assert client.delete("/v1/steering/modules/dir").status_code == 404
    assert client.delete("/v1/steering/modules/zeros").status_code == 400
    wrong = {"name": "w", "vectors": {"post_block": {"0": {"vector": [1.0, 2.0]}}}}
    assert client.post("/v1/steering/modules/register", json=wrong).status_code == 400


def test_api_key_guards_v1_routes_but_not_health(server_checkpoint):
    srv = start_server(
        server_checkpoint,
        "--api-key",
        "sekrit",
        "--max-prompt-tokens",
        "20",
        "--max-body-bytes",
        "4096",
        "--max-cells",
        "10",
    )
    try:
        with srv.client() as c:
            denied = c.get("/v1/models")
            assert denied.status_code == 401 and denied.json()["error"]["code"] == 401
            assert c.get("/health").status_code == 200
            headers = {"Authorization": "Bearer sekrit"}
            assert c.get("/v1/models", headers=headers).status_code == 200
            assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
            long = c.post(
                "/v1/patch_sweep",
                headers=headers,
                json={"prompt": CLEAN * 3, "source_module": "zeros"},
            )
            assert long.status_code == 413 and long.json()["error"]["param"] == "prompt"
            big = c.post("/v1/patch_sweep", headers=headers, json={"prompt": "x" * 8000})
            assert big.status_code == 413 and big.json()["error"]["code"] == 413
            many = c.post(
                "/v1/patch_sweep",
                headers=headers,
                json={"prompt": "When Mary", "source_module": "zeros"},
            )
            assert many.status_code == 400 and "at most 10" in many.json()["error"]["message"]
    finally:
        srv.stop()
