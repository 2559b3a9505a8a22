"""The base install (``pip install patchserve``) is the client: no torch, and a study runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STUDY = """
import importlib.util, json, sys
assert importlib.util.find_spec("torch") is None, "torch is installed"
from patchserve import PatchStudy, Span
with PatchStudy(sys.argv[1]) as study:
    result = study.sweep_layers_positions(
        "The capital of Sunror is", clean_prompt="The capital of Rorsun is",
        answer_token=" Pesmum", foil_token=" Terzir", metric="recovered",
        positions=[Span("Sunror"), -1], on_cell=lambda event: None,
    )
print(json.dumps({"argmax": result.argmax, "torch": "torch" in sys.modules}))
"""


def test_the_base_install_runs_a_study_without_torch(demo_server, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(REPO)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    done = subprocess.run(
        [str(python), "-c", STUDY, demo_server.url], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["torch"] is False and out["argmax"]["value"] >= 0.99
    served = subprocess.run(
        [str(bin_dir / "patchserve"), "serve"], capture_output=True, text=True, timeout=120
    )
    assert served.returncode == 2
    assert served.stderr.strip().endswith("pip install 'patchserve[serve]'")
    remote = subprocess.run(
        [
            str(bin_dir / "patchserve"),
            "sweep",
            "--url",
            demo_server.url,
            "--clean",
            "The capital of Rorsun is",
            "--corrupt",
            "The capital of Sunror is",
            "--answer",
            " Pesmum",
            "--metric",
            "recovered",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "top 5 cells (highest recovered first)" in remote.stdout
