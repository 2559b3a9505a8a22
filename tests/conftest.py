"""Shared fixtures: tiny random checkpoints of every family, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import FAMILIES, build_checkpoint

torch.set_num_threads(1)  # tiny test models: threads only add overhead


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="also run the long checks (marked 'long'; `make test-long`), left out of `make test`",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: a long run, collected only with --long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    long = [item for item in items if item.get_closest_marker("long")]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [item for item in items if not item.get_closest_marker("long")]


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request: pytest.FixtureRequest, checkpoint_root: Path) -> Path:
    return build_checkpoint(request.param, checkpoint_root)
