"""``patchserve bench`` runs end to end and its methods agree on the grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


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


def test_bench_times_the_sweep_without_batch_invariance_beside_it(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--layers", "2", "--width", "64", "--vocab", "300", "--tokens", "10"]
    args += ["--threads", "1", "--naive-cells", "2", "--no-peers", "--dtype", "bfloat16"]
    args += ["--invariance-cost", "--cache-dir", str(tmp_path / "models"), "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "patchserve.cli.main", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "batch invariance costs" in done.stdout
    report = json.loads(out.read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods[:2] == ["patchserve", "patchserve, invariant=False"]
    assert report["fastest_peer"] == "batched full forward"  # never the engine itself
    assert report["invariance_overhead"] > -1
    assert 0 <= report["max_abs_diff_vs_not_invariant"] < 0.1  # bf16 rounding, not bits


def test_the_gpu_check_runs_on_the_cpu_and_agrees_with_transformers(tmp_path):
    out = tmp_path / "gpu.json"
    script = Path(__file__).parents[2] / "benchmarks" / "gpu.py"
    args = ["--device", "cpu", "--small", "--shapes", "qwen3-small", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(script), *args, "--cache-dir", str(tmp_path / "models")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "| 12 | patchserve | 36 |" in done.stdout
    (shape,) = json.loads(out.read_text())["shapes"]
    assert shape["parity_max_abs_logprob_diff"] < 1e-4  # float32 on the CPU
    rows = shape["studies"]
    assert {r["tokens"] for r in rows} == {12, 5}
    methods = {r["method"] for r in rows}
    assert {"patchserve", "transformers forward hooks (batched)"} <= methods
    hooks = [r for r in rows if r["method"].startswith("transformers")]
    assert all(r["max_abs_diff"] < 1e-4 for r in hooks)
    assert all(r["cells_per_second"] > 0 for r in rows)
    assert "patchserve, invariant=False" in methods
    assert all(r["bit_invariant"] is True for r in rows if r["method"] == "patchserve")
    (gen,) = shape["generation"]  # batched steered generation against transformers' generate
    clients = shape["generation_clients"]  # concurrent clients on one scheduler, same tokens
    assert clients["same_rows"] == "2/2" and clients["concurrent_tok_s"] > 0
    assert gen["same_rows"] == "2/2" and gen["patchserve_tok_s"] > 0
