"""Batch-invariant passes: a row's result, bit for bit, whatever rows share its batch.

A sweep packs many patched rows into one pass, and which rows share a batch
depends on the request (the grid, the batch budget, the cells an
``attribution+verify`` request recomputes). Floating-point results depend on
the shapes the kernels see: a matrix product picks its kernel and the order of
its sums by the number of rows (a few rows take another path than many; with
several threads the split of the work moves too), and attention's sums depend
on how many keys and queries it is handed. So the same cell computed in two
differently composed batches could differ in the last bits.

Inside :func:`batch_invariant`:

* every projection of the model (:class:`Linear`) multiplies by a weight that
  MKL packed once (``cblas_sgemm_pack``, through ``torch.ops.mkl``): with the
  packing fixed, each output row's sums run in one order whatever the number of
  rows — checked when a weight is packed, on 1, 7 and 61 rows. Where that path
  is missing or the check fails (no MKL, another device or dtype), rows run in
  fixed blocks of :data:`ROW_BLOCK` (the last one zero-padded), every product
  the same shape whatever the number of rows:

  - on the CPU one ``mm`` per block (:func:`blocked_linear`; a Python loop, but a
    64-row product is large enough there that the loop costs little: batch
    invariance costs about 20 % of a sweep on an AMD EPYC, fp32 and bf16 alike,
    docs/performance.md; a batched ``bmm`` is no faster there);
  - on an accelerator (CUDA) one ``torch.bmm`` per :data:`TILE_BLOCKS` blocks
    (:func:`tiled_linear`): every call ``[TILE_BLOCKS, ROW_BLOCK, k] @ [k, n]``
    (the weight broadcast, not copied), the last call zero-padded — a 4096-row
    pass is 4 calls, not 64 launches. One call shape means one kernel
    configuration from the library's heuristics (cuBLAS picks by m, n, k and
    batch count; split-K and the like are fixed with it), and each row's
    product is a 64-row problem of its own, so neither where a row sits nor
    how many rows there are changes its sums. That is checked on the device
    when a weight is first used (:func:`tiles_checked`: rows shifted across
    blocks and calls, 1, 7 rows); where it fails, the per-block loop;
* resumed attention (``Layout.absolute``) gives every row the same geometry:
  all of its prompt's positions as keys (cached prefix, then its own), a query
  slot for each — and runs in fixed batches of :data:`ATTENTION_ROWS` rows
  (:func:`fixed_row_batches`, the last zero-padded): attention kernels split
  their work by the batch size (the CPU's one-query SDPA with two threads or
  more; flash-decoding's split of the keys on CUDA), and a split of the keys
  changes the order of a row's sums.

Rows are then computed independently of one another, and a sweep cell's value
is a function of the cell alone (``tests/engine/test_batch_invariance.py``, every
family).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

log = logging.getLogger(__name__)

ROW_BLOCK = 64
TILE_BLOCKS = 16  # blocks per batched call of the tiled path: 1024 rows
ATTENTION_ROWS = 16  # rows per attention call in absolute geometry
TILED_ON_CPU = False  # take the tiled path on the CPU too (tests: the accelerator's code path)
_invariant: ContextVar[bool] = ContextVar("patchserve_batch_invariant", default=False)
_PROBE_ROWS = (1, 7, 61)


@contextmanager
def batch_invariant() -> Iterator[None]:
    """Run this thread's :class:`Linear` projections batch-invariantly (see module doc)."""
    token = _invariant.set(True)
    try:
        yield
    finally:
        _invariant.reset(token)


_sweeps_invariant: ContextVar[bool] = ContextVar("patchserve_sweeps_invariant", default=True)


@contextmanager
def sweeps_not_invariant() -> Iterator[None]:
    """Measurement only (``patchserve bench --invariance both``): sweeps run in this thread
    as they would without batch invariance — plain products, packed attention groups
    (``invariant=False``). Their cells then agree with an invariant sweep's to float
    rounding, not bit for bit; nothing in the server enters this."""
    token = _sweeps_invariant.set(False)
    try:
        yield
    finally:
        _sweeps_invariant.reset(token)


def sweeps_invariant() -> bool:
    """Whether a sweep in this thread runs its passes batch-invariantly (always, but inside
    :func:`sweeps_not_invariant`)."""
    return _sweeps_invariant.get()


_plain: ContextVar[bool] = ContextVar("patchserve_plain_unembedding", default=False)


@contextmanager
def plain_unembedding() -> Iterator[None]:
    """Let ``packed_always`` projections take the plain kernel in this thread (outside
    :func:`batch_invariant`): a batched generation's logits need no bit-for-bit agreement
    with a sweep's, and where no packed path exists a 64-row block would multiply the work
    of a decoding step's few rows."""
    token = _plain.set(True)
    try:
        yield
    finally:
        _plain.reset(token)


def blocked_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = ROW_BLOCK
) -> torch.Tensor:
    """``F.linear`` computed ``rows`` rows at a time (the last block zero-padded), each
    block written in place into the output."""
    flat = x.reshape(-1, x.shape[-1])
    n, full = flat.shape[0], flat.shape[0] - flat.shape[0] % rows
    out = flat.new_empty(n, weight.shape[0])
    wt = weight.t()
    for start in range(0, full, rows):
        _project(flat[start : start + rows], wt, bias, out[start : start + rows])
    if full < n:
        block = flat.new_zeros(rows, flat.shape[1])
        block[: n - full] = flat[full:]
        out[full:] = _project(block, wt, bias)[: n - full]
    return out.reshape(*x.shape[:-1], weight.shape[0])


def tiled_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: int = ROW_BLOCK,
    blocks: int = TILE_BLOCKS,
) -> torch.Tensor:
    """``F.linear`` as batched products of one fixed shape: the rows zero-padded to a
    multiple of ``blocks * rows``, each ``blocks * rows`` of them one ``torch.bmm`` of
    ``[blocks, rows, k]`` by the weight broadcast to ``[blocks, k, n]`` (``baddbmm`` with
    the bias, added in the product's own precision)."""
    flat = x.reshape(-1, x.shape[-1])
    (n, k), m = flat.shape, weight.shape[0]
    step = rows * blocks
    total = -(-n // step) * step
    if total == 0:
        return flat.new_empty(*x.shape[:-1], m)
    if total != n:
        flat = torch.cat([flat, flat.new_zeros(total - n, k)])
    wt = weight.t().expand(blocks, k, m)
    tiles = flat.reshape(-1, blocks, rows, k)
    if bias is None:
        parts = [torch.bmm(tile, wt) for tile in tiles]
    else:
        b = bias.expand(blocks, rows, m)
        parts = [torch.baddbmm(b, tile, wt) for tile in tiles]
    out = torch.cat(parts).reshape(total, m)[:n]
    return out.reshape(*x.shape[:-1], m)


def tiles_checked(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`tiled_linear` gives each row the same bits wherever it sits and
    however many rows there are, on a probe on ``weight``'s device and dtype: rows
    shifted across blocks and calls, the last 1 and 7 alone (a meta tensor has no
    values: shapes only, true)."""
    if weight.device.type == "meta":
        return True
    with torch.no_grad():
        w = weight.detach()
        n = ROW_BLOCK * TILE_BLOCKS + 2 * ROW_BLOCK + 5  # two calls, the second padded
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(n, w.shape[1], generator=gen).to(w.device, w.dtype)
        ref = tiled_linear(probe, w, bias)
        for lo, hi in ((n - 1, n), (n - 7, n), (5, n), (0, ROW_BLOCK + 6)):
            if not torch.equal(tiled_linear(probe[lo:hi], w, bias), ref[lo:hi]):
                log.warning(
                    "tiled %s products on %s vary with the rows beside them: 64-row blocks",
                    tuple(w.shape),
                    w.device,
                )
                return False
    return True


def fixed_row_batches(
    fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, rows: int = ATTENTION_ROWS
) -> torch.Tensor:
    """``fn(*tensors)`` over ``rows`` rows (dim 0) at a time, the last call zero-padded:
    every call the same shape, so however a kernel splits its work by the batch size, a
    row's result does not depend on how many rows share the pass. Every part is made
    contiguous (a kernel's path can follow the strides too). ``fn`` must compute each row
    on its own (zero rows give finite values)."""
    n = tensors[0].shape[0]
    outs = []
    for start in range(0, n, rows):
        part = [t[start : start + rows].contiguous() for t in tensors]
        if len(part[0]) < rows:
            part = [torch.cat([p, p.new_zeros(rows - len(p), *p.shape[1:])]) for p in part]
        outs.append(fn(*part))
    return torch.cat(outs)[:n]


def _project(
    x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    if bias is None:
        return torch.mm(x, wt, out=out)
    return torch.addmm(bias, x, wt, out=out)


def _mkl_packable(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


def _packed_linear(
    x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkl._mkl_linear(flat, packed, weight, bias, flat.shape[0])
    return out.reshape(*x.shape[:-1], weight.shape[0])


def pack_checked(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The MKL-packed ``weight``, if this machine has the path and its products are
    row-count invariant on a probe; else None (blocks are used instead)."""
    if not _mkl_packable(weight):
        return None
    with torch.no_grad():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), ROW_BLOCK)
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(max(_PROBE_ROWS), weight.shape[1], generator=gen)
        ref = _packed_linear(probe, packed, weight.detach(), bias)
        for n in _PROBE_ROWS:
            if not torch.equal(_packed_linear(probe[-n:], packed, weight.detach(), bias), ref[-n:]):
                log.debug("packed %s products vary with the row count: blocks", tuple(weight.shape))
                return None
    return packed


def pack_weights(model: nn.Module) -> tuple[int, int]:
    """Pack every :class:`Linear` of ``model`` now (else its first batch-invariant pass
    does): (packed, projections). A server does it at start-up."""
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    return sum(m.pack() is not None for m in layers), len(layers)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) that runs batch-invariantly
    inside :func:`batch_invariant`. ``packed_always`` (the unembedding): takes the
    batch-invariant path (packed, else blocks) in every pass, so logits from any pass — a
    prefill's baseline, a sweep's cell — come from the same kernel and agree bit for bit."""

    packed_always = False
    _packed: tuple[tuple[object, ...], torch.Tensor | None] | None = None  # (weight key, pack)
    _tiles: tuple[tuple[object, ...], bool] | None = None  # (weight key, tiles_checked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        invariant = _invariant.get()
        if not (invariant or (self.packed_always and not _plain.get())):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # the packed path has no backward (attribution's gradient pass)
            return self._fixed_shape(x) if invariant else super().forward(x)
        packed = None if TILED_ON_CPU else self.pack()
        if packed is not None:
            return _packed_linear(x, packed, self.weight.detach(), self.bias)
        # No row-count-invariant packed path here (another CPU, device or dtype): blocks, for
        # invariant passes and for ``packed_always`` in every pass alike — one kernel per row.
        return self._fixed_shape(x)

    def _fixed_shape(self, x: torch.Tensor) -> torch.Tensor:
        """Products of one shape for every row count: batched tiles on an accelerator
        (where they pass :func:`tiles_checked`), else one ``mm`` per 64-row block."""
        if (x.device.type != "cpu" or TILED_ON_CPU) and self.tiles():
            return tiled_linear(x, self.weight, self.bias)
        return blocked_linear(x, self.weight, self.bias)

    def _weight_key(self) -> tuple[object, ...]:
        w = self.weight
        version = 0 if w.is_inference() else w._version  # inference tensors have no counter
        return (w.data_ptr(), version, w.device, w.dtype, tuple(w.shape))

    def pack(self) -> torch.Tensor | None:
        """The packed weight, made once (again when the weight changes: moved, reloaded)."""
        key = self._weight_key()
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack_checked(self.weight, self.bias))
        return self._packed[1]

    def tiles(self) -> bool:
        """Whether the tiled path is row-invariant for this weight (probed once per weight)."""
        key = self._weight_key()
        if self._tiles is None or self._tiles[0] != key:
            self._tiles = (key, tiles_checked(self.weight, self.bias))
        return self._tiles[1]
