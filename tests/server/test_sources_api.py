"""/v1/patch_source: capture, manifests, activations, persistence, the store's budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import load_reference
from conftest import start_server
from models.helpers import loaded, tokenizer
from patchserve.engine import CapturedRun
from patchserve.server.store import RunStore
from patchserve.wire.packing import unpack_vectors

CLEAN = "When Mary and John went to the store, John gave a drink to"


def test_capture_returns_manifest_top_logprobs_and_grading(client, server):
    body = client.post(
        "/v1/patch_source",
        json={
            "run": "cap-1",
            "prompt": CLEAN,
            "hooks": {"post_block": "all", "attn_head": [1]},
            "answer_token_id": 5,
            "foil_token_id": 9,
            "logprobs": 3,
        },
    ).json()
    assert body["run"] == "cap-1" and body["kept"] is True
    assert body["hooks"] == {"post_block": [0, 1, 2], "attn_head": [1]}
    assert body["token_ids"] == tokenizer(server.folder).encode(CLEAN).ids
    assert len(body["top_logprobs"]) == 3
    lps = [t["logprob"] for t in body["top_logprobs"]]
    assert lps == sorted(lps, reverse=True)
    assert body["graded"]["answer_token_id"] == 5 and body["graded"]["foil_token_id"] == 9
    # graded against log_softmax of a plain transformers forward of the prompt, sign included
    with torch.inference_mode():
        ids = torch.tensor([body["token_ids"]])
        logits = load_reference(server.folder)(ids).logits[0, -1].double()
    logprobs = torch.log_softmax(logits, -1)
    diff = float(logprobs[5] - logprobs[9])  # = logits[5] - logits[9]
    assert abs(diff) > 1e-2  # a flipped sign could not pass
    assert body["graded"]["logit_diff"] == pytest.approx(diff, abs=1e-4)
    assert body["graded"]["logprob"] == pytest.approx(float(logprobs[5]), abs=1e-4)
    top = torch.topk(logprobs, 3).values.tolist()
    assert lps == pytest.approx(top, abs=1e-4)
    dup = client.post("/v1/patch_source", json={"run": "cap-1", "prompt": CLEAN})
    assert dup.status_code == 409 and dup.json()["error"]["param"] == "run"
    assert (
        client.post(
            "/v1/patch_source", json={"run": "cap-1", "prompt": CLEAN, "overwrite": True}
        ).status_code
        == 200
    )


def test_activations_round_trip_exactly(client, server):
    client.post(
        "/v1/patch_source",
        json={"run": "acts", "prompt": CLEAN, "hooks": {"mlp_out": [2]}, "overwrite": True},
    )
    body = client.get(
        "/v1/patch_source/acts", params={"include": "activations", "hook": "mlp_out", "layer": 2}
    ).json()
    got = unpack_vectors(body["activations"])
    model = loaded(server.folder).model
    from patchserve.models import HookContext

    ids = torch.tensor([tokenizer(server.folder).encode(CLEAN).ids])
    with torch.inference_mode():
        expected = model.prefill(ids, HookContext.build(capture=[(2, "mlp_out")])).captured[
            2, "mlp_out"
        ][0]
    assert np.array_equal(got, expected.numpy())
    missing = client.get(
        "/v1/patch_source/acts", params={"include": "activations", "hook": "mlp_out", "layer": 0}
    )
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "bad", [{"run": "a/b"}, {"run": ".hidden"}, {"run": "x" * 200}, {"run": "a..b"}]
)
def test_run_names_are_validated(client, bad):
    response = client.post("/v1/patch_source", json={**bad, "prompt": CLEAN})
    assert response.status_code == 400 and response.json()["error"]["param"] == "run"


def test_bad_capture_requests(client):
    assert (
        client.post("/v1/patch_source", json={"prompt": CLEAN, "hooks": {"resid": [0]}}).status_code
        == 400
    )
    assert (
        client.post(
            "/v1/patch_source", json={"prompt": CLEAN, "hooks": {"post_block": [9]}}
        ).status_code
        == 400
    )
    assert (
        client.post("/v1/patch_source", json={"prompt": CLEAN, "positions": [500]}).status_code
        == 400
    )
    assert client.post("/v1/patch_source", json={"prompt": ""}).status_code == 400
    assert client.get("/v1/patch_source/nope").status_code == 404


def test_kept_runs_survive_a_restart_with_identical_activations(server_checkpoint, tmp_path):
    source_dir = tmp_path / "runs"
    first = start_server(server_checkpoint, "--source-dir", str(source_dir))
    try:
        with first.client() as c:
            c.post(
                "/v1/patch_source",
                json={"run": "persist", "prompt": CLEAN, "hooks": {"post_block": [1]}},
            )
            c.post(
                "/v1/patch_sweep",
                json={
                    "prompt": CLEAN.replace("Mary", "Mari"),
                    "clean_prompt": CLEAN,
                    "layers": [0],
                    "source_run": "swept-kept",
                    "keep_source": True,
                },
            )
            before = c.get(
                "/v1/patch_source/persist",
                params={"include": "activations", "hook": "post_block", "layer": 1},
            ).json()
    finally:
        first.stop()
    # one file per run, its manifest in the safetensors header
    assert sorted(p.name for p in source_dir.iterdir()) == [
        "persist.safetensors",
        "swept-kept.safetensors",
    ]
    second = start_server(server_checkpoint, "--source-dir", str(source_dir))
    try:
        with second.client() as c:
            names = [m["run"] for m in c.get("/v1/patch_source").json()["data"]]
            assert {"persist", "swept-kept"} <= set(names)
            after = c.get(
                "/v1/patch_source/persist",
                params={"include": "activations", "hook": "post_block", "layer": 1},
            ).json()
            assert after["activations"]["data"] == before["activations"]["data"]
            assert c.delete("/v1/patch_source/persist").status_code == 200
    finally:
        second.stop()
    assert not (source_dir / "persist.safetensors").exists()


def _run(name: str, nbytes: int) -> CapturedRun:
    acts = {("post_block", 0): torch.zeros(nbytes // 4)}
    return CapturedRun(name, "p", [1], [0], acts, None)


def test_store_evicts_least_recently_used_but_never_a_leased_run(tmp_path):
    store = RunStore(budget_bytes=3000)
    a, b, c = _run("a", 1000), _run("b", 1000), _run("c", 1000)
    for r in (a, b, c):
        store.put(r)
    store.get("a")  # a is now more recent than b
    with store.lease(store.get("b")):
        store.put(_run("d", 1000))  # over budget: b is leased, so c goes
        assert "b" in store and "c" not in store
        assert store.manifest("b").leases == 1
        assert store.drop("b")  # an owner drop wins even while leased
    assert "b" not in store and store.names() == ["a", "d"]


def test_kept_persisted_runs_are_evicted_to_disk_and_reloaded(tmp_path):
    store = RunStore(budget_bytes=1500, source_dir=tmp_path)
    kept = _run("kept", 1000)
    kept.kept = True
    store.put(kept)
    store.put(_run("other", 1000))
    assert "kept" in store.names()  # evicted from memory, still on disk
    assert store.get("kept").activations["post_block", 0].shape == (250,)


def test_listing_persisted_runs_does_not_load_their_activations(tmp_path):
    run = CapturedRun(
        "on-disk",
        "p",
        [1, 2],
        [0, 1],
        {("post_block", 0): torch.randn(2, 8), ("attn_head", 1): torch.randn(2, 2, 4)},
        torch.randn(5),
    )
    run.kept = True
    RunStore(budget_bytes=10**9, source_dir=tmp_path).put(run)
    reloaded = RunStore(budget_bytes=10**9, source_dir=tmp_path)
    assert reloaded.manifest("on-disk") == run.manifest(leases=0)
    assert reloaded.nbytes() == 0  # still on disk only
    assert torch.equal(
        reloaded.get("on-disk").activations["attn_head", 1], run.activations["attn_head", 1]
    )
    assert reloaded.nbytes() == run.nbytes()
