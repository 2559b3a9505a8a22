"""A real server on an architecture with no native family (the transformers runtime), and
``--runtime`` / ``patchserve info`` on the command line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from checkpoints import build_checkpoint
from conftest import Server, start_server
from generic_checkpoints import build_generic_checkpoint
from patchserve.cli.main import main
from patchserve.engine import capture_run, prepare_sweep, run_sweep
from patchserve.models import HOOKS, load_model
from patchserve.text.tokenizer import Tokenizer

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mari and John went to the store, John gave a drink to"
GLM4_HOOKS = ["pre_attn", "post_block", "attn_head"]  # GLM-4 norms its branch outputs


@pytest.fixture(scope="module")
def glm4(checkpoint_root: Path) -> Path:
    return build_generic_checkpoint("glm4", checkpoint_root)


@pytest.fixture(scope="module")
def generic_server(glm4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("generic-logs") / "server.log"
    srv = start_server(glm4, "--log-level", "info", log=log)
    srv.log = log  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def _assert_refused(response, param: str, hook: str) -> None:
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert f"hook {hook!r} is not available" in error["message"]
    assert "transformers runtime" in error["message"]
    assert ", ".join(GLM4_HOOKS) in error["message"]


def test_models_says_runtime_and_hooks_and_the_log_says_why(generic_server):
    with generic_server.client() as c:
        card = c.get("/v1/models").json()["data"][0]
    assert card["architecture"] == "Glm4ForCausalLM"
    assert card["runtime"] == "transformers"
    assert card["hooks"] == GLM4_HOOKS
    log = generic_server.log.read_text()  # type: ignore[attr-defined]
    assert "architecture Glm4ForCausalLM has no native family; serving through transformers" in log


def test_sweep_over_http_equals_the_in_process_engine(generic_server, glm4):
    with generic_server.client() as c:
        body = c.post(
            "/v1/patch_sweep",
            json={"prompt": CORRUPT, "clean_prompt": CLEAN, "hooks": ["post_block", "attn_head"]},
        )
    assert body.status_code == 200, body.text
    grids = {g["hook"]: g["grid"] for g in body.json()["hook_grids"]}
    model, tok = load_model(glm4).model, Tokenizer.from_folder(glm4)
    n = model.cfg.num_layers
    run = capture_run(
        model, "c", CLEAN, tok.encode(CLEAN).ids, {h: list(range(n)) for h in GLM4_HOOKS}
    )
    spec, _ = prepare_sweep(
        model, tok, prompt=CORRUPT, source=run, hooks=["post_block", "attn_head"]
    )
    local = run_sweep(model, spec).grids
    for hook in ("post_block", "attn_head"):
        mine, theirs = np.array(grids[hook], dtype=float), np.array(local[hook], dtype=float)
        np.testing.assert_allclose(mine, theirs, atol=1e-6, rtol=0)


def test_hooks_the_module_tree_cannot_give_are_400s_naming_the_ones_it_has(generic_server):
    with generic_server.client() as c:
        sweep = {"prompt": CORRUPT, "clean_prompt": CLEAN}
        _assert_refused(
            c.post("/v1/patch_sweep", json={**sweep, "hook": "attn_out"}), "hook", "attn_out"
        )
        _assert_refused(
            c.post("/v1/patch_sweep", json={**sweep, "hooks": ["post_block", "post_attn"]}),
            "hooks",
            "post_attn",
        )
        capture = c.post("/v1/patch_source", json={"prompt": CLEAN, "hooks": {"mlp_out": [0]}})
        _assert_refused(capture, "hooks", "mlp_out")
        every = c.post("/v1/patch_source", json={"run": "all", "prompt": CLEAN})
        assert every.status_code == 200, every.text
        assert sorted(every.json()["hooks"]) == sorted(GLM4_HOOKS)


def test_info_prints_the_runtime_and_hooks(glm4, checkpoint_root, capsys):
    assert main(["info", "--model", str(glm4)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["runtime"] == "transformers" and info["hooks"] == GLM4_HOOKS
    assert "no native family" in info["fallback"]
    llama = build_checkpoint("llama", checkpoint_root)
    assert main(["info", "--model", str(llama)]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"] == "native"
    assert main(["info", "--model", str(llama), "--runtime", "transformers"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["runtime"] == "transformers" and forced["fallback"] is None
    assert main(["info", "--model", str(glm4), "--runtime", "native"]) == 2
    assert "unsupported architecture: Glm4ForCausalLM" in capsys.readouterr().err


def test_serve_runtime_transformers_forces_it_on_a_native_architecture(checkpoint_root):
    llama = build_checkpoint("llama", checkpoint_root)
    srv = start_server(llama, "--runtime", "transformers")
    try:
        with srv.client() as c:
            card = c.get("/v1/models").json()["data"][0]
            post_attn = c.post(
                "/v1/patch_sweep",
                json={"prompt": CORRUPT, "clean_prompt": CLEAN, "hook": "post_attn"},
            )
    finally:
        srv.stop()
    assert card["runtime"] == "transformers"
    assert "post_attn" not in card["hooks"] and "attn_out" in card["hooks"]
    assert post_attn.status_code == 400


def test_completions_and_steering_modules_refuse_unavailable_hooks(generic_server):
    with generic_server.client() as c:
        plain = c.post("/v1/completions", json={"prompt": CLEAN, "max_tokens": 3, "temperature": 0})
        assert plain.status_code == 200, plain.text
        steer = [{"layer": 0, "hook": "attn_out", "source_module": "zeros", "scale": 1.0}]
        steered = c.post("/v1/completions", json={"prompt": CLEAN, "steer": steer})
        assert steered.status_code == 400
        assert "hook 'attn_out' is not available" in steered.json()["error"]["message"]
        module = c.post(
            "/v1/steering/modules/register",
            json={"name": "m", "vectors": {"mlp_out": {"0": {"vector": [0.0] * 64}}}},
        )
        _assert_refused(module, "vectors", "mlp_out")


def test_the_client_captures_every_hook_the_model_has(generic_server):
    from patchserve.client.study import PatchStudy

    with PatchStudy(generic_server.url) as study:
        run = study.capture_clean(CLEAN, run="client-all", layers=[0, 2])
    assert run.hooks == {hook: [0, 2] for hook in GLM4_HOOKS}


def test_a_native_model_says_native_and_every_hook(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["runtime"] == "native"
    assert card["hooks"] == list(HOOKS)
