"""``patchserve.PatchStudy`` / ``AsyncPatchStudy`` against a real server process.

The per-cell path (one ``/v1/completions`` patch request per cell, graded on
the client) is an independent implementation of the sweep, so its grids must
equal the server's sweep engine to float32 precision; streaming must deliver
every cell once and build the same result; every method and error class is
exercised on the wire.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
from client_prompts import CLEAN, CORRUPT, CORRUPT_LONGER

import patchserve
from patchserve import (
    APIConnectionError,
    AsyncPatchStudy,
    AuthenticationError,
    BadRequestError,
    CleanRun,
    ConflictError,
    NotFoundError,
    PatchServeError,
    PatchStudy,
    RequestTooLargeError,
    Span,
    SweepResult,
)
from patchserve.text import spans
from patchserve.wire import packing

matplotlib.use("Agg")

ANSWER, FOIL = " the", " of"  # single tokens of the test tokenizer
TOL = 1e-5
REPO = Path(__file__).resolve().parents[2]


def assert_same_result(a: SweepResult, b: SweepResult, tol: float = TOL) -> None:
    """Equal grids (None where skipped) and the same axes, baselines and skip lists."""
    assert (a.hook, a.metric, a.layers, a.positions) == (b.hook, b.metric, b.layers, b.positions)
    assert a.heads == b.heads and a.tokens == b.tokens
    x, y = a.to_numpy(), b.to_numpy()
    assert x.shape == y.shape
    assert np.array_equal(np.isnan(x), np.isnan(y))
    np.testing.assert_allclose(x, y, rtol=0, atol=tol, equal_nan=True)
    assert a.clean == pytest.approx(b.clean, abs=tol)
    assert a.corrupt == pytest.approx(b.corrupt, abs=tol)
    assert a.skipped == b.skipped and a.alignment == b.alignment
    assert a.answer_token_id == b.answer_token_id and a.foil_token_id == b.foil_token_id


# -- 1. the per-cell path equals the server's sweep ------------------------------------------


@pytest.mark.parametrize(
    ("metric", "foil"), [("logprob", None), ("logit_diff", FOIL), ("kl", None)]
)
def test_per_cell_grid_equals_server_side(
    study: PatchStudy, clean_run: CleanRun, metric: str, foil: str | None
) -> None:
    kwargs: dict[str, Any] = dict(
        clean=clean_run, answer_token=ANSWER, foil_token=foil, metric=metric
    )
    server = study.sweep_layers_positions(CORRUPT, **kwargs)
    client = study.sweep_layers_positions(CORRUPT, server_side=False, **kwargs)
    assert server.server_side and not client.server_side
    assert len(server.layers) == 3 and len(server.positions) == 8  # the whole grid
    assert_same_result(server, client)
    if metric == "kl":
        assert client.clean == pytest.approx(0.0, abs=TOL)
        assert client.top(1)[0]["value"] >= 0.0 - TOL


def test_per_cell_spans_alignment_heads_and_default_answer(
    study: PatchStudy, clean_run: CleanRun
) -> None:
    # Unequal lengths: the differing middle is skipped, spans are resolved on the client.
    positions = [Span("France"), 0, 9]
    kwargs: dict[str, Any] = dict(clean=clean_run, positions=positions, metric="recovered")
    server = study.sweep_layers_positions(CORRUPT_LONGER, **kwargs)
    client = study.sweep_layers_positions(CORRUPT_LONGER, server_side=False, **kwargs)
    assert server.positions == [4, 5, 6, 7, 8, 0, 9]
    assert len(server.skipped) == 3 * 5 and server.alignment["mode"] == "prefix_suffix"
    assert_same_result(server, client)  # also the default answer: the clean top-1 token
    # 'recovered' reports clean and corrupt raw (log p(answer) here), as the seed does.
    clean_top1 = clean_run.top_logprobs[0] if clean_run.top_logprobs else None
    assert client.clean == pytest.approx(server.clean, abs=1e-5) and server.clean < 0
    if clean_top1 is not None:
        assert server.clean == pytest.approx(clean_top1["logprob"], abs=1e-5)
    # attn_head: [layer][position][head]
    kwargs = dict(clean=clean_run, hook="attn_head", heads=[0, 3], layers=[1], positions=[5, 7])
    server = study.sweep_layers_positions(CORRUPT, answer_token=ANSWER, **kwargs)
    client = study.sweep_layers_positions(CORRUPT, answer_token=ANSWER, server_side=False, **kwargs)
    assert server.to_numpy().shape == (1, 2, 2)
    assert_same_result(server, client)
    # alpha and a dimension mask travel with every per-cell patch entry.
    kwargs = dict(clean=clean_run, layers=[0, 1], positions=[4, 6, 7], alpha=0.5, mask=[0, 5, 9])
    server = study.sweep_layers_positions(CORRUPT, metric="prob", **kwargs)
    client = study.sweep_layers_positions(CORRUPT, metric="prob", server_side=False, **kwargs)
    assert_same_result(server, client)


def test_per_cell_rejects_what_only_the_server_does(study: PatchStudy, clean_run: CleanRun) -> None:
    with pytest.raises(ValueError, match="hooks"):
        study.sweep_layers_positions(
            CORRUPT, clean=clean_run, hooks=["attn_out", "mlp_out"], server_side=False
        )
    with pytest.raises(ValueError, match="capture_clean"):
        study.sweep_layers_positions(CORRUPT, clean_prompt=CLEAN, server_side=False)
    with pytest.raises(ValueError, match="not captured"):
        study.sweep_layers_positions(
            CORRUPT, clean_prompt=CLEAN, run="never-captured", server_side=False
        )
    with pytest.raises(ValueError, match="exactly one token"):
        study.sweep_layers_positions(
            CORRUPT, clean=clean_run, answer_token=" Madrid", layers=[0], server_side=False
        )
    with pytest.raises(ValueError, match="not found"):
        study.sweep_layers_positions(
            CORRUPT, clean=clean_run, positions=[Span("Madrid")], server_side=False
        )
    narrow = study.capture_clean(CLEAN, run="client-narrow", hooks=["mlp_out"], layers=[0])
    try:
        with pytest.raises(ValueError, match="no post_block activations"):
            study.sweep_layers_positions(CORRUPT, clean=narrow, server_side=False)
    finally:
        assert study.drop_run(narrow)


# -- 2. streaming ---------------------------------------------------------------------------


def test_on_cell_streams_every_cell_once(study: PatchStudy, clean_run: CleanRun) -> None:
    events: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = dict(clean=clean_run, answer_token=ANSWER, metric="logprob")
    streamed = study.sweep_layers_positions(CORRUPT, on_cell=events.append, **kwargs)
    plain = study.sweep_layers_positions(CORRUPT, **kwargs)
    cells = Counter((e["hook"], e["layer"], e["position"]) for e in events)
    assert len(events) == 3 * 8 == events[0]["total"] and set(cells.values()) == {1}
    assert all(e["type"] == "cell" for e in events)
    assert_same_result(streamed, plain, tol=1e-9)
    for e in events:
        assert e["value"] == pytest.approx(streamed.value(e["layer"], e["position"]), abs=1e-12)
    # Several hooks, streamed: {hook: SweepResult}, one event per (hook, layer, position).
    events.clear()
    multi = study.sweep_layers_positions(
        CORRUPT, clean_prompt=CLEAN, hooks=["attn_out", "mlp_out"], layers=[0, 2],
        positions=[Span("Italy"), 7], on_cell=events.append,
    )  # fmt: skip
    assert isinstance(multi, dict) and list(multi) == ["attn_out", "mlp_out"]
    assert multi["mlp_out"].hook == "mlp_out" and multi["mlp_out"].positions == [4, 5, 6, 7]
    sites = {(e["hook"], e["layer"], e["position"]) for e in events}
    assert len(events) == 2 * 2 * 4 == len(sites)
    for e in events:
        assert e["value"] == pytest.approx(multi[e["hook"]].value(e["layer"], e["position"]))
    # The per-cell path reports its cells the same way.
    events.clear()
    per_cell = study.sweep_layers_positions(
        CORRUPT, layers=[1, 2], server_side=False, on_cell=events.append, **kwargs
    )
    assert sorted((e["layer"], e["position"]) for e in events) == [
        (layer, p) for layer in (1, 2) for p in range(8)
    ]
    assert sorted(e["done"] for e in events) == list(range(1, 17))
    assert_same_result(per_cell, study.sweep_layers_positions(CORRUPT, layers=[1, 2], **kwargs))


def test_a_raising_callback_cancels_the_stream(study: PatchStudy) -> None:
    class Stop(Exception):
        pass

    def stop(event: dict[str, Any]) -> None:
        raise Stop

    with pytest.raises(Stop):
        study.sweep_layers_positions(CORRUPT, clean_prompt=CLEAN, on_cell=stop)
    deadline = time.monotonic() + 5
    while any(r.run.startswith("study-") for r in study.list_runs()):  # dropped on disconnect
        assert time.monotonic() < deadline, "the auto-captured run outlived the stream"
        time.sleep(0.05)
    assert study.sweep_layers_positions(CORRUPT, clean_prompt=CLEAN, layers=[0]).grid


# -- one-call auto-capture, runs, spans -------------------------------------------------------


def test_auto_capture_uses_a_fresh_run_per_call(study: PatchStudy) -> None:
    first = study.sweep_layers_positions(CORRUPT, clean_prompt=CLEAN, layers=[0])
    second = study.sweep_layers_positions(CORRUPT, clean_prompt=CLEAN, layers=[0])
    assert first.auto_captured and second.auto_captured
    assert first.captured_source_run != second.captured_source_run
    stored = {r.run for r in study.list_runs()}
    assert first.captured_source_run not in stored and second.captured_source_run not in stored
    kept = study.sweep_layers_positions(CORRUPT, clean_prompt=CLEAN, layers=[0], keep_source=True)
    assert kept.captured_source_run in {r.run for r in study.list_runs()}
    assert study.drop_run(kept.captured_source_run) is True
    assert study.drop_run(kept.captured_source_run) is False
    assert first.grid == second.grid


def test_capture_clean_and_runs(study: PatchStudy) -> None:
    run = study.capture_clean(
        CLEAN, run="client-capture", layers=[0, 2], hooks=["post_block", "mlp_out"]
    )
    try:
        assert isinstance(run, CleanRun) and run.run == run.name == "client-capture"
        assert run.prompt == CLEAN and run.token_ids == study.tokenize(CLEAN)["tokens"]
        assert run.hooks == {"post_block": [0, 2], "mlp_out": [0, 2]}
        assert run.positions == list(range(8)) and run.top_logprobs
        assert study.get_run("client-capture").token_ids == run.token_ids
        with pytest.raises(ConflictError, match="already exists") as info:
            study.capture_clean(CLEAN, run="client-capture")
        assert info.value.status_code == 409 and info.value.param == "run"
        again = study.capture_clean(
            CLEAN, run="client-capture", hooks={"attn_head": "all"}, overwrite=True,
            answer_token=ANSWER, foil_token=FOIL,
        )  # fmt: skip
        assert again.hooks == {"attn_head": [0, 1, 2]} and again.graded["answer_token_id"] > 0
        default = study.capture_clean(CLEAN)  # server-chosen name, every hook at every layer
        assert len(default.hooks) == 7 and study.drop_run(default)
    finally:
        assert study.drop_run("client-capture") is True
    assert study.drop_run("client-capture") is False
    with pytest.raises(NotFoundError):
        study.get_run("client-capture")


def test_positions_for_matches_the_server(study: PatchStudy, clean_run: CleanRun) -> None:
    prompt = "When Mary and John went to the store, John gave a drink to"
    first, second = study.positions_for(prompt, "John"), study.positions_for(prompt, "John", 1)
    assert first and second and first[-1] < second[0]
    assert study.positions_for(prompt, Span("John", 1)) == second
    encoded = study.tokenize(prompt)
    assert second == spans.resolve_span(
        prompt, encoded["offsets"], encoded["special"], spans.Span("John", 1)
    )
    assert study.positions_for(CORRUPT, "Italy") == [4, 5, 6]
    result = study.sweep_layers_positions(
        CORRUPT, clean=clean_run, layers=[0], positions=[Span("Italy"), 7, 5]
    )
    assert result.positions == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="occurs 2 time"):
        study.positions_for(prompt, "John", 2)
    with pytest.raises(BadRequestError, match="not found"):
        study.sweep_layers_positions(CORRUPT, clean=clean_run, positions=[Span("Rome")])


# -- 3. results and heatmaps ------------------------------------------------------------------


def test_result_helpers_and_heatmap_png(
    study: PatchStudy, clean_run: CleanRun, tmp_path: Path
) -> None:
    import matplotlib.pyplot as plt

    result = study.sweep_layers_positions(
        CORRUPT_LONGER, clean=clean_run, answer_token=ANSWER, metric="logprob"
    )
    grid = result.to_numpy()
    assert grid.shape == (3, 10) and np.isnan(grid[:, 4:9]).all()
    best = result.argmax_cell()
    assert best is not None and result.argmax is not None
    assert (best["layer"], best["position"]) == (result.argmax["layer"], result.argmax["position"])
    assert best["value"] == pytest.approx(result.argmax["value"])
    top = result.top(4)
    assert [c["value"] for c in top] == sorted((c["value"] for c in top), reverse=True)
    assert top[0]["token"] == result.tokens[top[0]["position"]]
    assert math.isclose(top[0]["value"], float(np.nanmax(grid)))
    assert result.noise_floor is not None and result.timing["cells"] == 30

    ax = result.heatmap()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    differing = set(result.alignment["differing_positions"])
    assert differing == set(range(4, 9))  # the unaligned middle is where the corruption is
    starred = [
        f"{label} *" if p in differing else label
        for label, p in zip(result.token_labels(), result.positions, strict=True)
    ]
    assert labels == starred and "' is'" in labels[-1]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    norm = ax.images[0].norm
    assert norm.vcenter == pytest.approx(result.corrupt)
    path = tmp_path / "heatmap.png"
    ax.figure.savefig(path, dpi=80)
    plt.close(ax.figure)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    pixels = plt.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 200
    assert pixels[..., :3].std() > 0.05  # not a blank image

    recovered = study.sweep_layers_positions(CORRUPT, clean=clean_run, metric="recovered")
    fig, axes = plt.subplots(1, 2)
    assert recovered.heatmap(axes[0], colorbar=False) is axes[0]
    assert axes[0].images[0].norm.vcenter == 0.0
    plt.close(fig)

    import pandas as pd

    frame = result.to_pandas()
    assert isinstance(frame, pd.DataFrame) and frame.shape == (3, 10)
    assert list(frame.index) == [0, 1, 2] and frame.columns[0] == (0, result.tokens[0])


# -- 4. errors, sync and async, zoom, ablation ------------------------------------------------


def test_errors_carry_the_server_message(study: PatchStudy, server_checkpoint: Path) -> None:
    with pytest.raises(BadRequestError) as info:  # a 400, as the seed answers
        study.sweep_layers_positions(CORRUPT, run="no-such-run")
    err = info.value
    assert err.status_code == 400 and err.type == "invalid_request_error"
    assert err.param == "source_run"
    assert err.message == err.response.json()["error"]["message"]
    assert "source run 'no-such-run' not found" in str(err)
    with pytest.raises(BadRequestError) as bad:
        study.sweep_layers_positions(CORRUPT, clean_prompt=CLEAN, metric="accuracy")
    assert bad.value.param == "metric" and "unknown metric 'accuracy'" in bad.value.message
    with pytest.raises(BadRequestError, match="needs a foil"):  # also when streaming
        study.sweep_layers_positions(
            CORRUPT, clean_prompt=CLEAN, metric="logit_diff", on_cell=lambda e: None
        )
    with pytest.raises(ValueError, match="clean_prompt"):
        study.sweep_layers_positions(CORRUPT)
    with pytest.raises(APIConnectionError), PatchStudy("http://127.0.0.1:9") as dead:
        dead.health()
    assert issubclass(RequestTooLargeError, PatchServeError)

    from server.conftest import start_server

    guarded = start_server(server_checkpoint, "--api-key", "sekrit", "--max-prompt-tokens", "12")
    try:
        with PatchStudy(guarded.url) as anonymous, pytest.raises(AuthenticationError) as auth:
            anonymous.model_info()
        assert auth.value.status_code == 401
        with PatchStudy(guarded.url, api_key="sekrit") as keyed:
            assert keyed.model_info()["num_layers"] == 3
            with pytest.raises(RequestTooLargeError, match="at most 12") as big:
                keyed.sweep_layers_positions(CORRUPT_LONGER * 2, clean_prompt=CLEAN)
            assert big.value.status_code == 413 and big.value.param == "prompt"
    finally:
        guarded.stop()


def test_async_client_matches_the_sync_facade(
    server: Any, study: PatchStudy, clean_run: CleanRun
) -> None:
    async def main() -> tuple[SweepResult, SweepResult, list[int], bool]:
        async with AsyncPatchStudy(server.url, max_concurrency=4) as s:
            seen: list[int] = []

            async def on_cell(event: dict[str, Any]) -> None:  # coroutine callbacks work too
                seen.append(event["position"])

            streamed = await s.sweep_layers_positions(
                CORRUPT, clean=clean_run.run, layers=[1], on_cell=on_cell
            )
            per_cell = await s.sweep_layers_positions(
                CORRUPT, run=clean_run.run, layers=[1], server_side=False
            )
            return streamed, per_cell, seen, await s.drop_run("not-there")

    streamed, per_cell, seen, dropped = asyncio.run(main())
    sync = study.sweep_layers_positions(CORRUPT, clean=clean_run, layers=[1])
    assert sorted(seen) == list(range(8)) and dropped is False
    assert_same_result(streamed, sync, tol=1e-9)
    assert_same_result(per_cell, sync)
    assert study.hook == "post_block" and study.base_url == server.url


def test_zoom_coarse_to_fine(study: PatchStudy) -> None:
    before = {r.run for r in study.list_runs()}
    zoom = study.zoom(CORRUPT, clean_prompt=CLEAN, answer_token=ANSWER, stride=2, top_positions=3)
    assert {r.run for r in study.list_runs()} == before  # the temporary capture is dropped
    assert zoom.coarse.layers == [0, 2] and zoom.coarse.positions == list(range(8))
    assert zoom.block in ([0, 1], [2]) and zoom.fine.layers == zoom.block
    assert len(zoom.positions) == 3 and zoom.fine.positions == zoom.positions
    coarse = zoom.coarse.to_numpy()
    best_row = zoom.coarse.layers[int(np.nanargmax(np.nanmax(coarse, axis=1)))]
    assert zoom.block[0] == best_row
    column_best = np.nanmax(coarse, axis=0)
    threshold = np.sort(column_best)[-3]
    assert all(column_best[p] >= threshold for p in zoom.positions)
    # The refined grid re-measures the coarse cells it shares, to the same values.
    layer = zoom.block[0]
    for p in zoom.positions:
        assert zoom.fine.value(layer, p) == pytest.approx(zoom.coarse.value(layer, p), abs=TOL)
    assert zoom.top(1)[0]["value"] == pytest.approx(float(np.nanmax(zoom.fine.to_numpy())))
    # kl: lower is better, so the best block is the coarse row with the smallest value.
    kl = study.zoom(CORRUPT, clean_prompt=CLEAN, metric="kl", stride=2, top_positions=2)
    kl_coarse = kl.coarse.to_numpy()
    assert kl.block[0] == kl.coarse.layers[int(np.nanargmin(np.nanmin(kl_coarse, axis=1)))]


def test_ablation_sweep_sources_and_masks(study: PatchStudy) -> None:
    width = study.model_info()["hidden_size"]
    kwargs: dict[str, Any] = dict(hook="mlp_out", layers=[0, 1], answer_token=ANSWER)
    zeros = study.ablation_sweep(CORRUPT, **kwargs)
    assert zeros.alignment is None and zeros.to_numpy().shape == (2, 8)
    assert np.isfinite(zeros.to_numpy()).all()
    # The same zero vector sent inline, and a mask of every dimension, change nothing.
    inline = study.ablation_sweep(CORRUPT, source=np.zeros(width), **kwargs)
    np.testing.assert_allclose(inline.to_numpy(), zeros.to_numpy(), atol=1e-9)
    full_mask = study.ablation_sweep(CORRUPT, mask=list(range(width)), **kwargs)
    np.testing.assert_allclose(full_mask.to_numpy(), zeros.to_numpy(), atol=1e-9)
    weights = study.ablation_sweep(CORRUPT, mask=np.ones(width, dtype=np.float32), **kwargs)
    np.testing.assert_allclose(weights.to_numpy(), zeros.to_numpy(), atol=1e-9)
    # alpha = 0 and an all-zero mask are exact no-ops: every cell is the corrupt baseline.
    noop = study.ablation_sweep(CORRUPT, alpha=0.0, **kwargs)
    np.testing.assert_allclose(noop.to_numpy(), noop.corrupt, atol=1e-9)
    nothing = study.ablation_sweep(CORRUPT, mask=np.zeros(width), **kwargs)
    np.testing.assert_allclose(nothing.to_numpy(), nothing.corrupt, atol=1e-9)
    # A registered module, and several hooks at once.
    rng = np.random.default_rng(0)
    vectors = {"mlp_out": {layer: rng.normal(size=width) for layer in range(3)}}
    study.register_module("client-dir", vectors, overwrite=True)
    module = study.ablation_sweep(CORRUPT, source="client-dir", **kwargs)
    direct = study.ablation_sweep(CORRUPT, source=vectors["mlp_out"][0], **kwargs)
    np.testing.assert_allclose(module.to_numpy()[0], direct.to_numpy()[0], atol=1e-6)
    both = study.ablation_sweep(CORRUPT, hooks=["attn_out", "mlp_out"], layers=[2])
    assert isinstance(both, dict) and set(both) == {"attn_out", "mlp_out"}
    with pytest.raises(BadRequestError, match="clean_baseline"):
        study.ablation_sweep(CORRUPT, metric="recovered", **kwargs)
    rec = study.ablation_sweep(CORRUPT, metric="recovered", clean_baseline=0.0, **kwargs)
    # clean and corrupt are the raw baselines (log p(answer)); the grid is in recovered units.
    plain = study.ablation_sweep(CORRUPT, metric="logprob", **kwargs)
    assert rec.clean == 0.0 and rec.corrupt == pytest.approx(plain.corrupt, abs=1e-9)
    expected = (plain.to_numpy() - plain.corrupt) / (0.0 - plain.corrupt)
    np.testing.assert_allclose(rec.to_numpy(), expected, atol=1e-9)


def test_pack_vectors_and_light_import() -> None:
    assert PatchStudy.pack_vectors is packing.pack_vectors is patchserve.pack_vectors
    assert AsyncPatchStudy.pack_vectors is packing.pack_vectors
    assert patchserve.Span is spans.Span
    packed = patchserve.pack_vectors(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert packed["shape"] == [2, 3] and packed["dtype"] == "float32"
    np.testing.assert_array_equal(packing.unpack_vectors(packed), np.arange(6).reshape(2, 3))
    code = (
        "import sys, patchserve\n"
        "assert 'httpx' not in sys.modules and 'torch' not in sys.modules\n"
        "from patchserve import PatchStudy, Span, SweepResult, CleanRun\n"
        "heavy = {'torch', 'matplotlib', 'pandas', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
