"""The README's curl examples run against a real server and succeed."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def curl_commands() -> list[str]:
    text = README.read_text()
    block = text.split("<!-- curl-examples -->")[1].split("<!-- /curl-examples -->")[0]
    body = block.split("```bash")[1].split("```")[0]
    commands, current = [], []
    for line in body.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("curl") and current:
            commands.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        commands.append("\n".join(current))
    return commands


def run_curl(command: str, url: str) -> str:
    env = {**os.environ, "PATCHSERVE_URL": url}
    done = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (command, done.stderr)
    return done.stdout.strip()


def test_readme_curl_examples_succeed_on_the_bundled_model(demo_server):
    """Each example runs as written and shows what its comment claims."""
    commands = curl_commands()
    assert len(commands) >= 10
    outputs = [run_curl(command, demo_server.url) for command in commands]
    bodies = []
    for command, out in zip(commands, outputs, strict=True):
        if '"stream": true' in command:
            events = [line for line in out.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            bodies.append(json.loads(events[-2][6:]))
            assert bodies[-1]["type"] == "summary"
        else:
            bodies.append(json.loads(out))
            assert "error" not in bodies[-1]
    study, stream, capture, listing, fetched, heads, ablation, completion = bodies[:8]
    # The one-call study: the subject and the last token; the fact comes back in full.
    assert study["positions"] == [4, 5, 6] and study["auto_captured"] is True
    assert study["argmax"]["value"] >= 0.99 and study["grid"][0][1] >= 0.8
    assert study["warnings"] == []
    # Two hooks on one stream, each with its grid.
    assert [g["hook"] for g in stream["hook_grids"]] == ["attn_out", "mlp_out"]
    # The stored run: listed, its activations fetched, patched from by head (kl: lower = better).
    assert capture["graded"]["logprob"] > -0.01  # the clean run is sure of " Pesmum"
    assert "rorsun" in [m["run"] for m in listing["data"]]
    assert fetched["activations"]["shape"][0] == len(fetched["token_ids"])
    assert heads["argmax"]["value"] == min(v for row in heads["grid"] for cell in row for v in cell)
    # Zeroing half the subject's MLP output moves the answer's log-probability.
    assert ablation["corrupt"] > -0.01 and ablation["grid"][0][0] != ablation["corrupt"]
    # The patched completion answers with the clean fact.
    choice = completion["choices"][0]
    assert choice["text"].startswith(" Pesmum")
    assert set(choice["logprob_token_ids"][0]) == {"877", "935"}


def test_readme_quickstart_curl_runs_the_study_it_describes(demo_server):
    """The first example a newcomer sees: one call, the whole residual-stream grid."""
    block = README.read_text().split("<!-- curl-quickstart -->")[1].split("<!-- /curl-")[0]
    command = block.split("```bash")[1].split("```")[0].strip()
    assert command.startswith("curl -sf http://127.0.0.1:8000/")
    body = json.loads(
        run_curl(command.replace("http://127.0.0.1:8000", "$PATCHSERVE_URL"), demo_server.url)
    )
    assert body["hook"] == "post_block" and body["auto_captured"] is True
    assert body["layers"] == [0, 1, 2, 3]
    # Every layer x every position; the fact comes back in full at the last token's late layers.
    assert body["positions"] == list(range(7)) and body["grid"][-1][-1] >= 0.99
    assert body["warnings"] == []


def test_readme_model_table_lists_every_native_architecture():
    """The README's table of native models names every architecture the registry loads."""
    from patchserve.models.registry import SUPPORTED_ARCHITECTURES

    table = README.read_text().split("<!-- native-models -->")[1].split("<!-- /native-")[0]
    named = set(re.findall(r"`(\w+ForCausalLM|\w+LMHeadModel)`", table))
    assert named == set(SUPPORTED_ARCHITECTURES)
