"""The named-vector registry behind ``source_module`` and ``steer`` (``server/modules.py``;
issue 26's mutation check): what it answers and what it refuses, with which error and param."""

from __future__ import annotations

import pytest
import torch

from patchserve.errors import Conflict, InvalidArgument, NotFound
from patchserve.server.modules import BUILTIN, ModuleRegistry

LIKE = torch.zeros(1, dtype=torch.float64)


def _vectors() -> dict[tuple[str, int], torch.Tensor]:
    return {
        ("post_block", 2): torch.tensor([1.0, 2.0, 3.0]),
        ("mlp_out", 0): torch.tensor([0.5, -0.5]),
        ("post_block", 0): torch.tensor([4.0]),
    }


def test_zeros_is_built_in_and_cannot_be_replaced_or_dropped():
    registry = ModuleRegistry()
    assert BUILTIN == "zeros" and registry.exists("zeros")
    for call in (lambda: registry.register("zeros", {}), lambda: registry.drop("zeros")):
        with pytest.raises(InvalidArgument) as info:
            call()
        assert info.value.param == "name"
    zeros = registry.vector("zeros", "post_block", 0, 5, torch.ones(2, dtype=torch.float16))
    assert zeros.dtype == torch.float16 and zeros.tolist() == [0.0] * 5


def test_register_conflict_overwrite_and_drop():
    registry = ModuleRegistry()
    assert not registry.exists("steer")
    registry.register("steer", _vectors())
    assert registry.exists("steer")
    with pytest.raises(Conflict) as info:
        registry.register("steer", {("post_block", 2): torch.tensor([9.0])})
    assert info.value.param == "name"
    assert registry.vector("steer", "post_block", 2, 3, LIKE).tolist() == [1.0, 2.0, 3.0]
    registry.register("steer", {("post_block", 2): torch.tensor([9.0])}, overwrite=True)
    assert registry.vector("steer", "post_block", 2, 1, LIKE).tolist() == [9.0]
    assert registry.drop("steer") is True
    assert registry.drop("steer") is False
    assert not registry.exists("steer")


def test_vector_is_the_registered_one_in_the_requested_dtype():
    registry = ModuleRegistry()
    registry.register("m", _vectors())
    got = registry.vector("m", "mlp_out", 0, 2, LIKE)
    assert got.dtype == torch.float64 and got.tolist() == [0.5, -0.5]
    with pytest.raises(NotFound) as missing:
        registry.vector("other", "mlp_out", 0, 2, LIKE)
    assert missing.value.param == "source_module"
    with pytest.raises(InvalidArgument) as no_site:
        registry.vector("m", "mlp_out", 1, 2, LIKE)
    assert no_site.value.param == "source_module" and "layer 1" in no_site.value.message


def test_listing_is_sorted_with_zeros_first():
    registry = ModuleRegistry()
    registry.register("beta", _vectors())
    registry.register("alpha", {("attn_out", 1): torch.zeros(4)})
    listing = registry.listing()
    assert [m.name for m in listing] == ["zeros", "alpha", "beta"]
    assert listing[0].builtin is True and listing[0].vectors == []
    assert not listing[1].builtin and not listing[2].builtin
    beta = [(v.hook, v.layer, v.width) for v in listing[2].vectors]
    assert beta == [("mlp_out", 0, 2), ("post_block", 0, 1), ("post_block", 2, 3)]
    assert [(v.hook, v.layer, v.width) for v in listing[1].vectors] == [("attn_out", 1, 4)]
