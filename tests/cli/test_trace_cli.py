"""``patchserve sweep`` with ROME's flags: --noise/--window on one fact, --facts for a study."""

from __future__ import annotations

import json

from cli.test_sweep_cli import EXAMPLE, patchserve
from patchserve.assets import default_model_path

FACTS = default_model_path() / "examples.json"


def test_noise_and_window_on_one_fact(tmp_path):
    out = tmp_path / "out.json"
    done = patchserve(
        "sweep",
        "--clean",
        EXAMPLE["clean"],
        "--noise",
        "Rorsun",
        "--samples",
        "2",
        "--window",
        "3",
        "--hooks",
        "mlp_out",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    body = json.loads(out.read_text())
    assert body["window"] == 3 and body["noise"]["samples"] == 2
    assert body["noise"]["positions"] and body["hook_grids"][0]["stderr"]
    assert "mlp_out — logprob" in done.stdout


def test_facts_file_prints_the_role_table_and_writes_png_and_json(tmp_path):
    facts = [e for e in json.loads(FACTS.read_text()) if e["relation"] == "colour"][:2]
    path, out, png = tmp_path / "facts.json", tmp_path / "out.json", tmp_path / "roles.png"
    path.write_text(json.dumps(facts))
    done = patchserve(
        "sweep",
        "--facts",
        str(path),
        "--samples",
        "2",
        "--metric",
        "prob",
        "--json",
        str(out),
        "--out",
        str(png),
    )
    assert done.returncode == 0, done.stderr
    assert "post_block — mean prob - corrupt, 2 facts" in done.stdout
    assert "last subject token" in done.stdout
    body = json.loads(out.read_text())
    assert len(body["items"]) == 2 and len(body["subjects"]) == 2
    assert [g["hook"] for g in body["aggregate"]["hook_grids"]] == ["post_block"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_conflicting_corruptions_fail_cleanly():
    done = patchserve("sweep", "--clean", "a", "--corrupt", "b", "--noise", "a")
    assert done.returncode != 0 and "exactly one of --corrupt and --noise" in done.stderr
