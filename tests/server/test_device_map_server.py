"""``patchserve serve --device-map``: the same API and the same numbers as one device."""

from __future__ import annotations

from server.conftest import start_server

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"


def test_split_server_reports_its_stages_and_answers_alike(server, server_checkpoint):
    body = {
        "clean_prompt": CLEAN,
        "prompt": CORRUPT,
        "hooks": ["post_block", "attn_out"],
        "metric": "logprob",
    }
    split = start_server(server_checkpoint, "--device-map", "cpu:0,cpu:1-2")
    try:
        with split.client() as c, server.client() as plain:
            assert c.get("/v1/models").json()["data"][0]["device"] == "cpu:0-0,cpu:1-2"
            assert plain.get("/v1/models").json()["data"][0]["device"] == "cpu"
            got, want = (
                c.post("/v1/patch_sweep", json=body),
                plain.post("/v1/patch_sweep", json=body),
            )
            assert got.status_code == want.status_code == 200, got.text
            grids = [[e["grid"] for e in r.json()["hook_grids"]] for r in (got, want)]
            assert grids[0] == grids[1] and len(grids[0]) == 2
    finally:
        split.stop()
