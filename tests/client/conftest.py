"""Client tests run against a real server process: the server tests' fixtures, reused.

``tests/conftest.py`` puts ``tests/`` on ``sys.path``; the ``server`` fixture
(a uvicorn process on loopback serving the tiny random qwen3 checkpoint, one
thread) and ``start_server`` come from ``tests/server/conftest.py``. Imported
here, the session fixture serves the client tests (a process of their own).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_prompts import CLEAN

from patchserve import CleanRun, PatchStudy
from server.conftest import Server, demo_server, server, server_checkpoint, start_server

__all__ = ["Server", "demo_server", "server", "server_checkpoint", "start_server"]


@pytest.fixture(scope="module")
def study(server: Server) -> Iterator[PatchStudy]:
    with PatchStudy(server.url) as s:
        yield s


@pytest.fixture(scope="module")
def clean_run(study: PatchStudy) -> Iterator[CleanRun]:
    run = study.capture_clean(CLEAN, run="client-spain", overwrite=True)
    yield run
    study.drop_run(run)
