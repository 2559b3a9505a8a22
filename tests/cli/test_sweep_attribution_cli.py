"""``patchserve sweep --method attribution+verify`` on the bundled model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from patchserve.assets import default_model_path


def test_verified_attribution_marks_estimates_and_saves_the_kinds(tmp_path):
    example = json.loads((default_model_path() / "examples.json").read_text())[0]
    out = tmp_path / "out.json"
    args = ["--clean", example["clean"], "--corrupt", example["corrupt"]]
    args += ["--answer", example["answer"], "--foil", example["foil"], "--metric", "recovered"]
    verify = ["--method", "attribution+verify", "--verify-top-k", "3", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "patchserve.cli.main", "sweep", *args, *verify],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert done.returncode == 0, done.stderr
    assert "method attribution+verify" in done.stdout
    body = json.loads(out.read_text())
    kinds = np.asarray(body["kinds"]["post_block"], dtype=object)
    assert (kinds == "exact").sum() >= 3 and (kinds == "estimate").any()
    best = body["argmax"]
    assert kinds[body["layers"].index(best["layer"]), body["positions"].index(best["position"])]
