"""A real uvicorn server process on loopback, serving a tiny checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from checkpoints import build_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    folder: Path | None
    args: list[str]

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(
    folder: Path | None,
    *extra: str,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Server:
    """A server on ``folder`` (None: no --model, i.e. the bundled demo model); ``env`` adds
    environment variables, ``preexec_fn`` runs in the child before it starts (rlimits)."""
    port = free_port()
    model = ["--model", str(folder)] if folder is not None else []
    args = [
        sys.executable,
        "-m",
        "patchserve.cli.main",
        "serve",
        *model,
        "--port",
        str(port),
        "--threads",
        "1",
        "--log-level",
        "warning",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        args, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return Server(url, process, folder, args)
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="session")
def server_checkpoint(checkpoint_root: Path) -> Path:
    return build_checkpoint("qwen3", checkpoint_root)


@pytest.fixture(scope="session")
def server(server_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    source_dir = tmp_path_factory.mktemp("sources")
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(server_checkpoint, "--source-dir", str(source_dir), log=log)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def demo_server() -> Iterator[Server]:
    """A server on the bundled demo model (``patchserve serve`` with no --model)."""
    srv = start_server(None)
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
