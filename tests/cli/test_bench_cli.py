"""``patchserve bench`` runs end to end and its methods agree on the grid."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_prints_the_table_and_the_grids_agree(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchserve.cli.main",
            "bench",
            "--layers",
            "2",
            "--width",
            "64",
            "--vocab",
            "300",
            "--tokens",
            "10",
            "--threads",
            "1",
            "--naive-cells",
            "3",
            "--no-transformer-lens",
            "--cache-dir",
            str(tmp_path / "models"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "patchserve" in done.stdout and "batched full forward" in done.stdout
    report = json.loads(out.read_text())
    assert report["cells"] == 20
    assert report["max_abs_diff_vs_batched"] < 1e-4
    methods = [r["method"] for r in report["results"]]
    assert methods[:3] == ["patchserve", "batched full forward", "naive per-cell forward"]
