"""The client never needs torch: every path, the per-cell cross-check included, runs in a
process where importing torch fails."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from client_prompts import CLEAN, CORRUPT

from patchserve.engine.metrics import Grader
from patchserve.wire.metrics import kl_divergence, log_softmax

NO_TORCH = """
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")

sys.meta_path.insert(0, NoTorch())
from patchserve import PatchStudy, Span

out = {}
with PatchStudy(sys.argv[1]) as study:
    run = study.capture_clean(sys.argv[2], run="torch-free", overwrite=True)
    for metric in ("recovered", "kl", "logit_diff"):
        kwargs = dict(clean=run, layers=[0, 2], positions=[Span("Italy"), 0], metric=metric)
        if metric != "kl":
            kwargs["foil_token"] = 9
        cells = []
        server = study.sweep_layers_positions(sys.argv[3], on_cell=cells.append, **kwargs)
        client = study.sweep_layers_positions(sys.argv[3], server_side=False, **kwargs)
        out[metric] = {
            "server": server.grid, "client": client.grid, "cells": len(cells),
            "argmax": [server.argmax, client.argmax],
        }
    study.drop_run(run)
out["torch_loaded"] = "torch" in sys.modules
print(json.dumps(out))
"""


def test_every_client_path_runs_without_torch(server) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, server.url, CLEAN, CORRUPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out.pop("torch_loaded") is False
    for metric, result in out.items():
        server_grid = np.array(result["server"], dtype=float)
        client_grid = np.array(result["client"], dtype=float)
        np.testing.assert_allclose(client_grid, server_grid, atol=2e-4, err_msg=metric)
        assert result["cells"] == server_grid.size
        server_best, client_best = result["argmax"]
        assert (server_best["layer"], server_best["position"]) == (
            client_best["layer"],
            client_best["position"],
        ) or abs(server_best["value"] - client_best["value"]) < 2e-4


def test_engine_and_numpy_kl_agree() -> None:
    """The engine grades kl on the device; the shared numpy definition must give the same."""
    rng = np.random.default_rng(0)
    clean = rng.normal(size=50) * 3
    clean[7] = -np.inf  # a token the clean run can never produce contributes nothing
    rows = rng.normal(size=(4, 50)) * 3
    clean_lp = torch.log_softmax(torch.from_numpy(clean), -1)
    ours = Grader("kl", 0, clean_logprobs=clean_lp)(torch.from_numpy(rows)).numpy()
    reference = kl_divergence(log_softmax(clean[None])[0], log_softmax(rows))
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)
    assert (ours > 0).all()
