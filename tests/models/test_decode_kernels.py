"""The decoding passes' projections: oneDNN's kernel inside ``decoding_kernels()`` only, the
plain ``Linear`` (bit for bit) everywhere else and inside ``batch_invariant()``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patchserve.models.decode_kernels import DecodeLinear, decoding_kernels
from patchserve.models.invariance import Linear, batch_invariant


def _pair(bias: bool) -> tuple[DecodeLinear, Linear]:
    torch.manual_seed(0)
    # wide enough that oneDNN's order of sums differs from MKL's (a narrow one may agree)
    fast = DecodeLinear(512, 384, bias=bias)
    plain = Linear(512, 384, bias=bias)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_plain_linear_outside_the_decoding_context_and_inside_batch_invariant(bias):
    fast, plain = _pair(bias)
    x = torch.randn(5, 7, 512)
    assert torch.equal(fast(x), plain(x))
    with decoding_kernels(), batch_invariant():
        got = fast(x)
    with batch_invariant():
        assert torch.equal(got, plain(x))
    with decoding_kernels():
        if fast.reordered() is not None:  # the fast path is live here, and not what ran above
            assert not torch.equal(fast(x), got)


@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_decoding_products_agree_with_f_linear_to_float32_rounding(bias):
    fast, _ = _pair(bias)
    x = torch.randn(32, 1, 512)
    with decoding_kernels():
        got = fast(x)
    ref = F.linear(
        x.double(), fast.weight.double(), None if fast.bias is None else fast.bias.double()
    )
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    if fast.reordered() is None:
        pytest.skip("no oneDNN linear on this machine: F.linear was used")


def test_the_environment_turns_the_path_off(monkeypatch):
    monkeypatch.setenv("PATCHSERVE_DECODE_KERNELS", "0")
    fast, plain = _pair(True)
    x = torch.randn(8, 512)
    with torch.inference_mode(), decoding_kernels():
        assert torch.equal(fast(x), plain(x))
    assert fast.reordered() is None
