"""ROME-style corruption over HTTP: noise on a span, window restores, the replace form."""

from __future__ import annotations

import pytest

from engine.oracles import reference_sigma
from models.helpers import loaded, tokenizer
from patchserve.engine import capture_run, prepare_sweep
from patchserve.engine.noise import Noise, run_noised
from patchserve.models import INJECTABLE_HOOKS
from server.test_sweep_api import CLEAN, CORRUPT, sse_events

NOISE = {"type": "noise", "span": "Mary", "scale": 3.0, "samples": 3, "seed": 5}


def test_noise_sweep_over_http_equals_the_engine_bit_for_bit(client, server):
    body = {"prompt": CLEAN, "corruption": NOISE, "hooks": ["post_block", "mlp_out"], "window": 2}
    response = client.post("/v1/patch_sweep", json=body)
    assert response.status_code == 200, response.text
    got = response.json()
    model, tok = loaded(server.folder).model, tokenizer(server.folder)
    ids = tok.encode(CLEAN).ids
    n = model.cfg.num_layers
    run = capture_run(model, "local", CLEAN, ids, {h: list(range(n)) for h in INJECTABLE_HOOKS})
    spec, _ = prepare_sweep(
        model, tok, prompt=CLEAN, source=run, hooks=["post_block", "mlp_out"], window=2
    )
    span = got["noise"]["positions"]
    assert "Mary" in tok.decode([ids[p] for p in span])
    outcome = run_noised(model, spec, Noise(span, 3.0, 3, 5))
    for entry in got["hook_grids"]:
        assert entry["grid"] == outcome.grids[entry["hook"]]
        assert entry["stderr"] == outcome.stderr[entry["hook"]]
    assert got["stderr_grid"] == outcome.stderr["post_block"]
    assert got["window"] == 2
    assert got["noise"]["sigma"] == pytest.approx(3.0 * reference_sigma(server.folder), rel=1e-6)
    assert got["corrupt"] == outcome.corrupt
    assert got["warnings"] == []  # the same prompt twice is the point here
    assert got["alignment"]["differing_positions"] == []

    streamed = sse_events(client.post("/v1/patch_sweep", json={**body, "stream": True}))
    cells = [e for e in streamed if isinstance(e, dict) and e["type"] == "cell"]
    assert len(cells) == len(spec.layers) * len(spec.positions) * 2
    assert all("stderr" in c for c in cells)
    summary = streamed[-2]
    assert summary["type"] == "summary" and summary["hook_grids"] == got["hook_grids"]


def test_replace_corruption_is_the_two_field_form(client):
    plain = client.post("/v1/patch_sweep", json={"prompt": CORRUPT, "clean_prompt": CLEAN})
    replaced = client.post(
        "/v1/patch_sweep",
        json={"prompt": CLEAN, "corruption": {"type": "replace", "prompt": CORRUPT}},
    )
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["grid"] == plain.json()["grid"]
    assert replaced.json()["tokens"] == plain.json()["tokens"]


BAD = [
    ({**NOISE, "span": "Paris"}, {}, "corruption.span", "not found"),
    ({**NOISE, "span": [99]}, {}, "corruption.span", "out of range"),
    ({**NOISE, "samples": 0}, {}, "corruption.noise.samples", "greater than"),
    ({**NOISE, "samples": 10_000}, {}, "corruption.noise.samples", "less than"),
    ({**NOISE, "scale": -1}, {}, "corruption.noise.scale", "greater than"),
    (NOISE, {"clean_prompt": CORRUPT}, "clean_prompt", "no use"),
    (NOISE, {"source_module": "zeros"}, "source_module", "no use"),
    (NOISE, {"window": 0}, "window", "greater than"),
    ({"type": "blur"}, {}, "corruption", "'noise', 'replace'"),
]


@pytest.mark.parametrize(("corruption", "extra", "param", "words"), BAD)
def test_bad_corruptions_are_clear_400s(client, corruption, extra, param, words):
    body = {"prompt": CLEAN, "corruption": corruption, **extra}
    response = client.post("/v1/patch_sweep", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error
