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


def test_readme_curl_examples_succeed(server):
    commands = curl_commands()
    assert len(commands) >= 10
    env = {**os.environ, "PATCHSERVE_URL": server.url}
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (command, done.stderr)
        out = done.stdout.strip()
        if '"stream": true' in command:
            events = [line for line in out.splitlines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2][6:])["type"] == "summary"
        else:
            body = json.loads(out)
            assert "error" not in body
            if "patch_sweep" in command:
                assert re.search(r"grid", out)
