"""``patchserve sweep`` on the bundled model: table, PNG and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from patchserve.assets import default_model_path


def test_sweep_on_the_bundled_model_prints_the_table_and_writes_png_and_json(tmp_path):
    example = json.loads((default_model_path() / "examples.json").read_text())[0]
    png, out = tmp_path / "heatmap.png", tmp_path / "out.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchserve.cli.main",
            "sweep",
            "--clean",
            example["clean"],
            "--corrupt",
            example["corrupt"],
            "--answer",
            example["answer"],
            "--foil",
            example["foil"],
            "--metric",
            "recovered",
            "--out",
            str(png),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert done.returncode == 0, done.stderr
    assert "post_block — recovered" in done.stdout and "top 5 cells" in done.stdout
    body = json.loads(out.read_text())
    # 'recovered' reports the raw baselines (logit differences with a foil), as the seed does.
    assert body["clean"] > body["corrupt"]
    assert body["baselines"]["clean"]["value"] == body["clean"]
    assert max(max(v for v in row if v is not None) for row in body["grid"]) >= 0.8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_arguments_fail_cleanly(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchserve.cli.main",
            "sweep",
            "--clean",
            "a",
            "--corrupt",
            "b",
            "--layers",
            "x-y",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "bad layers" in done.stderr
