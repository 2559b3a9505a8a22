"""``method: attribution`` / ``attribution+verify`` on /v1/patch_sweep over a real server."""

from __future__ import annotations

import numpy as np

from server.test_sweep_api import CLEAN, CORRUPT, local_grid, sse_events


def test_verified_stream_sends_estimates_then_exact_cells_and_a_merged_summary(client, server):
    request = {
        "prompt": CORRUPT,
        "clean_prompt": CLEAN,
        "hooks": ["post_block", "attn_head"],
        "heads": [0, 1],
        "method": "attribution+verify",
        "verify_top_k": 3,
    }
    plain = client.post("/v1/patch_sweep", json=request).json()
    with client.stream("POST", "/v1/patch_sweep", json={**request, "stream": True}) as response:
        events = sse_events(response)
    start, cells, summary = events[0], events[1:-2], events[-2]
    n = start["total"]
    assert [c["kind"] for c in cells[:n]] == ["estimate"] * n
    assert len(cells) > n and {c["kind"] for c in cells[n:]} == {"exact"}
    assert [c["done"] for c in cells] == list(range(1, len(cells) + 1))
    assert summary["method"] == plain["method"] == "attribution+verify"
    for entry in summary["hook_grids"]:
        kinds = np.asarray(summary["kinds"][entry["hook"]], dtype=object)
        assert (kinds == "exact").any() and (kinds == "estimate").any()
    # Every exact cell equals the in-process exact sweep, bit for bit.
    exact = local_grid(server.folder, hooks=["post_block", "attn_head"], heads=[0, 1])
    streamed = {(c["hook"], c["layer"], c["position"], c.get("head")): c for c in cells[n:]}
    for (hook, layer, position, head), cell in streamed.items():
        i, j = exact.layers.index(layer), exact.positions.index(position)
        value = exact.grids[hook][i][j]
        assert cell["value"] == (value if head is None else value[[0, 1].index(head)])
    for key in ("timing", "captured_source_run", "source_run"):  # fresh names, own clocks
        summary.pop(key), plain.pop(key)
    assert summary.pop("type") == "summary"
    assert summary == plain


def test_plain_attribution_marks_every_cell_an_estimate(client):
    body = client.post(
        "/v1/patch_sweep",
        json={"prompt": CORRUPT, "clean_prompt": CLEAN, "method": "attribution", "metric": "kl"},
    ).json()
    assert body["method"] == "attribution" and body["noise_floor"] == 0.0
    kinds = np.asarray(body["kinds"]["post_block"], dtype=object)
    assert set(kinds.ravel()) == {"estimate"}
    grid = np.asarray(body["grid"], dtype=float)
    assert body["argmax"]["value"] == grid.min()  # kl: lower is more restored


def test_bad_method_fields_are_400s_in_the_error_shape(client):
    for extra, param in [
        ({"method": "fast"}, "method"),
        ({"verify_top_k": 3}, "verify_top_k"),
        ({"method": "attribution+verify", "verify_top_k": 0}, "verify_top_k"),
    ]:
        response = client.post(
            "/v1/patch_sweep", json={"prompt": CORRUPT, "clean_prompt": CLEAN, **extra}
        )
        assert response.status_code == 400, extra
        assert response.json()["error"]["param"] == param
