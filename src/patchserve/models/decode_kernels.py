"""Faster projections for a batched generation's passes (never a batch-invariant one).

On CPU in float32, oneDNN's linear on a weight reordered once into its own blocked layout
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what
``torch.compile`` uses on CPU) runs a decoding step's products much faster than
``F.linear`` (MKL): on this session's AMD EPYC (AVX-512), one thread, 32 rows, the
512 x 32000 unembedding at ~95 GFLOP/s instead of ~49 and the layers' products at ~105
instead of ~87 (``patchserve bench generate``, docs/performance.md).

Inside :func:`decoding_kernels` (entered by
:meth:`~patchserve.models.transformer.Transformer.run_on_block`, the passes of
:func:`~patchserve.engine.generation.generate_batch`), a :class:`DecodeLinear` takes that
path; everywhere else — and always inside
:func:`~patchserve.models.invariance.batch_invariant` — it is the plain
:class:`~patchserve.models.invariance.Linear`, so sweeps compute what they computed.
The products differ from ``F.linear``'s in the last bits (another order of the sums), as
``F.linear``'s own differ between 1 and 32 rows; a reordered weight whose products are not
within float32 rounding of ``F.linear``'s on a probe is not used.

Memory: one reordered copy of each projection weight that runs inside the context
(``q/k/v/o``, the MLP's, the unembedding — about the model's weights once more), made at
its first decoding pass and kept with the module (remade when the weight changes).
``PATCHSERVE_DECODE_KERNELS=0`` in the environment turns the path off (``F.linear``, no
copies) where that memory matters more than the speed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from patchserve.models.invariance import Linear, _invariant

log = logging.getLogger(__name__)

REORDER_ROWS = 64  # the row count oneDNN's blocked layout is chosen for
_decoding: ContextVar[bool] = ContextVar("patchserve_decoding_kernels", default=False)


@contextmanager
def decoding_kernels() -> Iterator[None]:
    """Let this thread's :class:`DecodeLinear` projections take oneDNN's kernel (see module
    doc); a :func:`~patchserve.models.invariance.batch_invariant` pass inside still does not."""
    token = _decoding.set(True)
    try:
        yield
    finally:
        _decoding.reset(token)


def _available(weight: torch.Tensor) -> bool:
    return (
        os.environ.get("PATCHSERVE_DECODE_KERNELS", "1") != "0"
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _onednn_linear(
    x: torch.Tensor, reordered: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, reordered, bias, "none", [], "")


def reorder_checked(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``weight`` in oneDNN's layout, if this machine has the path and its products agree
    with ``F.linear``'s within float32 rounding on a probe; else None (``F.linear``)."""
    if not _available(weight):
        return None
    try:
        with torch.no_grad():
            w = weight.detach()
            reordered = torch.ops.mkldnn._reorder_linear_weight(w, REORDER_ROWS)
            probe = torch.randn(7, w.shape[1], generator=torch.Generator().manual_seed(0))
            ref = F.linear(probe, w, bias)
            got = _onednn_linear(probe, reordered, bias)
    except RuntimeError as e:  # an op this build lacks for the shape
        log.debug("no oneDNN linear for %s: %s", tuple(weight.shape), e)
        return None
    # float32 sums of in_features products: a few units in the last place of the magnitudes
    bound = 1e-5 * (probe.abs() @ w.abs().t()).max() + 1e-6
    if got.shape != ref.shape or not bool(((got - ref).abs() <= bound).all()):
        log.warning("oneDNN linear disagrees with F.linear for %s: not used", tuple(weight.shape))
        return None
    return reordered


class DecodeLinear(Linear):
    """A :class:`~patchserve.models.invariance.Linear` that takes oneDNN's kernel on a
    reordered weight inside :func:`decoding_kernels` (outside batch-invariant passes)."""

    _reordered: tuple[tuple[object, ...], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _decoding.get() or _invariant.get() or x.device.type != "cpu":
            return super().forward(x)
        if x.dtype != torch.float32 or (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        ):
            return super().forward(x)
        reordered = self.reordered()
        if reordered is None:
            return super().forward(x)
        return _onednn_linear(x, reordered, self.bias)

    def reordered(self) -> torch.Tensor | None:
        """The weight in oneDNN's layout, made once (again when the weight changes)."""
        w = self.weight
        version = 0 if w.is_inference() else w._version  # inference tensors have no counter
        bias = self.bias
        key = (
            w.data_ptr(),
            version,
            w.device,
            w.dtype,
            tuple(w.shape),
            None if bias is None else bias.data_ptr(),
        )
        if self._reordered is None or self._reordered[0] != key:
            self._reordered = (key, reorder_checked(w, bias))
        return self._reordered[1]
