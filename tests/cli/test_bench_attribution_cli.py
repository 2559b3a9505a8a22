"""``patchserve bench attribution`` runs end to end; the transformers peer agrees with the
engine's exact grid, and the ranking scores are what they say."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from patchserve.bench.attribution import spearman, top_recall


def test_bench_attribution_reports_times_ranking_and_the_peer(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--layers", "2", "--width", "64", "--vocab", "300", "--tokens", "10"]
    args += ["--top-k", "3", "--threads", "1", "--cache-dir", str(tmp_path / "models")]
    args += ["--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "patchserve.cli.main", "bench", "attribution", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["cells"] == 20 and report["verified_cells"] == 3
    assert report["max_abs_diff_vs_peer"] < 1e-4  # the peer computes the same exact grid
    assert report["verified_bit_equal"] is True  # the verified cells are the exact grid's
    assert -1 <= report["spearman"] <= 1 and report["verified_top_recall"] == 1.0
    for key in ("exact_s", "attribution_s", "verify_s", "peer_s"):
        assert report[key] > 0


def test_ranking_scores():
    a = np.array([0.0, 1.0, 2.0, 3.0])
    assert spearman(a, a**3) == 1.0 and spearman(a, -a) == -1.0
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([0.0, 0.0, 5.0])) == 1.0  # ties
    assert top_recall(a, a[::-1].copy(), 0.0, 2) == 0.0
    assert top_recall(a, a * 2, 0.0, 2) == 1.0
