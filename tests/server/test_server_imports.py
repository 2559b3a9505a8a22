"""A server process does not import the Python client (``patchserve.client``): the package
root re-exports the client's names lazily, and the command line imports the client only
for the commands that print a study."""

from __future__ import annotations

import subprocess
import sys

from conftest import start_server


def test_importing_the_server_does_not_import_the_client():
    code = (
        "import sys, patchserve.server.app\n"
        "from patchserve.cli.main import build_parser\n"
        "build_parser().parse_args(['serve'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('patchserve.client')))\n"
        "from patchserve import PatchStudy, Span\n"  # the root's names: there on first use
        "print(PatchStudy.__module__, Span.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "patchserve.client.study patchserve.text.spans"]


def test_a_running_server_has_not_imported_the_client(server_checkpoint, tmp_path):
    """``patchserve serve`` itself, after serving a sweep: Python's import log
    (PYTHONPROFILEIMPORTTIME) names every module the process imported."""
    log = tmp_path / "server.log"
    srv = start_server(server_checkpoint, log=log, env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        with srv.client() as client:
            body = {"prompt": "When Mary and John", "clean_prompt": "When Mari and John"}
            assert client.post("/v1/patch_sweep", json={**body, "layers": [0]}).is_success
    finally:
        srv.stop()
    imported = [
        line.rsplit("|", 1)[1].strip()
        for line in log.read_text(errors="replace").splitlines()
        if line.startswith("import time:")
    ]
    assert "patchserve.server.app" in imported and "patchserve.cli.sweep" in imported
    assert [name for name in imported if name.startswith("patchserve.client")] == []
