"""``patchserve serve`` with no --model serves the bundled demo model."""

from __future__ import annotations

import json

from patchserve.assets import default_model_path


def test_serves_the_bundled_model_by_default(demo_server):
    folder = default_model_path()
    example = json.loads((folder / "examples.json").read_text())[0]
    with demo_server.client() as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == folder.name
        body = c.post(
            "/v1/patch_sweep",
            json={
                "prompt": example["corrupt"],
                "clean_prompt": example["clean"],
                "answer_token": example["answer"],
                "foil_token": example["foil"],
                "metric": "recovered",
            },
        ).json()
    assert body["grid"][-1][-1] == 1.0
    assert body["argmax"]["value"] >= 0.8
