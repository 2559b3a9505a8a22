"""Shared test helpers for the runtime tests."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from patchserve.models import LoadedModel, load_model
from patchserve.text.tokenizer import Tokenizer

PROMPT = "When Mary and John went to the store, John gave a drink to"
OTHER = "When Mari and John went to the store, John gave a drink to"
#: The CUDA cases are collected everywhere and skipped without a GPU, so `pytest -ra` lists them.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
    ),
]


@cache
def loaded(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    return load_model(folder, device=device, dtype=dtype)


@cache
def tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(folder)


def ids_of(folder: Path, text: str = PROMPT, device: str = "cpu") -> torch.Tensor:
    return torch.tensor([tokenizer(folder).encode(text).ids], device=device)
