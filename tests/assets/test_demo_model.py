"""Checks on the shipped demo model, ``patchserve/assets/demo_facts``.

These tests load the shipped files only (nothing is trained here) with plain
``transformers`` and verify the promises ``examples.json`` makes: equal-length pairs that
differ in one contiguous span, single-token answers and foils, a confident and
subject-dependent clean answer, and a naive post_block causal-tracing sweep that finds the
structure the demo is meant to show.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ASSET = Path(__file__).resolve().parents[2] / "src" / "patchserve" / "assets" / "demo_facts"


def asset_dir() -> Path:
    """The shipped folder: from the installed package if importable, else from the repo."""
    try:
        from importlib.resources import files

        path = Path(str(files("patchserve") / "assets" / "demo_facts"))
        if (path / "config.json").is_file():
            return path
    except (ImportError, TypeError):
        pass
    return REPO_ASSET


DEMO = asset_dir()


@cache
def load() -> tuple[Any, Any]:
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(DEMO)
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    model.eval()
    return model, tok


@cache
def examples() -> list[dict[str, str]]:
    return json.loads((DEMO / "examples.json").read_text())


def ids(text: str) -> list[int]:
    return load()[1](text)["input_ids"]


def single_token(text: str) -> int:
    out = load()[1].encode(text, add_special_tokens=False)
    assert len(out) == 1, f"{text!r} encodes to {out}"
    return out[0]


def differing(a: list[int], b: list[int]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


@torch.inference_mode()
def next_logprobs(prompt: str) -> torch.Tensor:
    logits = load()[0](input_ids=torch.tensor([ids(prompt)])).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)


@torch.inference_mode()
def post_block_recovered(ex: dict[str, str]) -> torch.Tensor:
    """Naive sweep: ``recovered`` of logit_diff for every (layer, position), [L, T]."""
    model, _ = load()
    clean, corrupt = ids(ex["clean"]), ids(ex["corrupt"])
    answer, foil = single_token(ex["answer"]), single_token(ex["foil"])
    layers = model.model.layers
    n = len(clean)

    def first(output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output

    saved: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda _m, _i, out, i=i: saved.__setitem__(i, first(out)))
        for i, layer in enumerate(layers)
    ]
    try:
        clean_logits = model(input_ids=torch.tensor([clean])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    corrupt_logits = model(input_ids=torch.tensor([corrupt])).logits[0, -1]
    m_clean = clean_logits[answer] - clean_logits[foil]
    m_corrupt = corrupt_logits[answer] - corrupt_logits[foil]
    rows = torch.arange(n)
    grid = torch.empty(len(layers), n)
    for i, layer in enumerate(layers):

        def patch(_m: Any, _i: Any, out: Any, i: int = i) -> Any:
            hidden = first(out).clone()
            hidden[rows, rows] = saved[i][0, rows]  # row r patches position r
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        handle = layer.register_forward_hook(patch)
        try:
            logits = model(input_ids=torch.tensor([corrupt] * n)).logits[:, -1]
        finally:
            handle.remove()
        grid[i] = (logits[:, answer] - logits[:, foil] - m_corrupt) / (m_clean - m_corrupt)
    return grid


def test_shipped_files_present_and_small() -> None:
    names = {p.name for p in DEMO.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "examples.json",
        "training_log.json",
    ):
        assert required in names
    config = json.loads((DEMO / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total < 20 * 1024 * 1024


def test_examples_schema() -> None:
    exs = examples()
    assert len(exs) >= 20
    for ex in exs:
        assert {"clean", "corrupt", "answer", "foil", "relation"} <= set(ex)
        assert ex["answer"] != ex["foil"]
        assert ex["answer"].startswith(" ") and ex["foil"].startswith(" ")


def test_training_log_reports_accuracy() -> None:
    log = json.loads((DEMO / "training_log.json").read_text())
    assert log["fact_accuracy"] >= 0.95
    assert "command" in log and "wall_seconds" in log


@pytest.mark.parametrize("i", range(len(examples())))
def test_pair_tokenization(i: int) -> None:
    ex = examples()[i]
    clean, corrupt = ids(ex["clean"]), ids(ex["corrupt"])
    assert len(clean) == len(corrupt) <= 24
    diff = differing(clean, corrupt)
    assert diff, "clean and corrupt prompts are identical"
    assert diff == list(range(diff[0], diff[-1] + 1)), "tokens differ in more than one span"
    single_token(ex["answer"])
    single_token(ex["foil"])


@pytest.mark.parametrize("i", range(len(examples())))
def test_pair_behaviour(i: int) -> None:
    ex = examples()[i]
    answer, foil = single_token(ex["answer"]), single_token(ex["foil"])
    clean, corrupt = next_logprobs(ex["clean"]), next_logprobs(ex["corrupt"])
    assert int(clean.argmax()) == answer
    assert int(corrupt.argmax()) == foil
    assert clean[answer].exp() > 0.5
    assert clean[answer] - corrupt[answer] > 1.0


@pytest.mark.parametrize("i", range(len(examples())))
def test_causal_tracing_finds_the_subject(i: int) -> None:
    ex = examples()[i]
    grid = post_block_recovered(ex)
    assert float(grid.max()) >= 0.8
    # Patching the last layer at the last position restores the clean logits exactly.
    assert float(grid[-1, -1]) == pytest.approx(1.0, abs=1e-4)
    diff = differing(ids(ex["clean"]), ids(ex["corrupt"]))
    assert int(grid[0].argmax()) in diff
