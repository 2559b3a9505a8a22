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


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session", params=FAMILIES)
def family_checkpoint(request: pytest.FixtureRequest, checkpoint_root: Path) -> Path:
    return build_checkpoint(request.param, checkpoint_root)
