"""Sweeps: exact activation-patching grids, computed as little as possible.

A cell patched at ``(hook, layer l, position p)`` changes nothing at layers
before ``l`` and nothing at positions before ``p``. So the corrupt run is
computed once — its residual stream entering every block, the branch
activations of the swept layers and its key/value cache — and each cell
recomputes only the lower-right block: layers from its patch point on, over
positions ``>= p``, attending to the corrupt cache for positions ``< p``
(one batch-1 cache shared by every row, never copied). Logits are computed at
the last prompt position only — and, for a multi-token answer, at the answer's
tokens appended to every row (``engine/continuation.py``: one *lane* per tail).
An ``attn_head`` cell that is not per position patches its head at every
selected position in one row, resumed from the earliest of them.

Where the cell resumes:

* ``pre_attn@l``: block ``l`` from the patched residual;
* ``post_block@l``: block ``l+1`` (its ``pre_attn`` *is* ``post_block@l``);
* ``attn_out``, ``post_attn``, ``mlp_in``, ``mlp_out@l``: inside block ``l``,
  after its (unchanged) attention, reusing the corrupt ``attn_out``;
* ``attn_head@l``: inside block ``l``, reusing the corrupt per-head outputs.

Cells are free when the patched value equals the corrupt activation bit for
bit (e.g. positions before the first differing token) or when nothing
downstream can reach the last position (a position-wise site of the last
block, ``p`` not last): both equal the corrupt baseline exactly.

Rows of one resume group are packed back to back under a token budget (no
padding in any projection or MLP), longest first so that attention padding
stays small, and under a cap on attention-score elements so that memory is
bounded by the budget, not by the grid.

This module holds a sweep's request (:class:`SweepSpec`), its cells and outcome,
and :func:`run_sweep`. The work is split as a serving engine splits a
scheduler from its model runner: ``sweep_lanes`` (the corrupt forward and the
answer lanes), ``sweep_rows`` (cells → patched rows, free and skipped cells),
``sweep_plan`` (rows → ordered batches under the budget: pure, no torch),
``sweep_executor`` (a batch → logits on the runtime), ``sweep_grading`` (logits
→ values) and ``sweep_runner`` (the loop that strings them together).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from patchserve.cancel import cancel_scope
from patchserve.engine.errors import Cancelled, SweepCancelled
from patchserve.engine.runs import CapturedRun
from patchserve.models import Transformer
from patchserve.models.hooks import SiteEdit
from patchserve.text.alignment import Alignment
from patchserve.wire.grids import assemble_grid

if TYPE_CHECKING:
    from patchserve.engine.attribution import AttributionRunner
    from patchserve.engine.sweep_runner import SweepRunner

DEFAULT_BATCH_TOKENS = 4096


@dataclass
class VectorSource:
    """An ablation source: one vector per ``(hook, layer)`` (``zeros`` is built in)."""

    name: str
    vector: Callable[[str, int], torch.Tensor]  # (hook, layer) -> [width]


Source = CapturedRun | VectorSource


@dataclass
class SweepSpec:
    corrupt_ids: list[int]
    hooks: list[str]
    layers: list[int]
    positions: list[int]
    source: Source | None  # None until a caller that captures the run sets it
    metric: str = "logprob"
    answer: int | None = None
    foil: int | None = None
    heads: list[int] | None = None
    alpha: float = 1.0
    masks: dict[str, torch.Tensor] | None = None  # hook -> [width] in [0, 1]
    clean_baseline: float | None = None  # m_clean for 'recovered' without clean logits
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS
    warnings: list[str] = field(default_factory=list)  # found while preparing the sweep
    answer_ids: list[int] | None = None  # a multi-token answer (wins over answer)
    foil_ids: list[int] | None = None  # a multi-token foil (wins over foil)
    per_position: bool = True  # attn_head: False = one cell per (layer, head), all positions
    window: int = 1  # a cell restores window_layers(layer) at once (ROME's window)
    corrupt_edits: list[SiteEdit] = field(default_factory=list)  # e.g. embedding noise
    # False: no unpatched probe row (noise_floor 0.0) — a layer block of a sweep split over
    # replicas, whose first block measures the noise floor as the whole sweep would.
    probe_noise: bool = True
    method: str = "exact"  # or "attribution", "attribution+verify" (engine/attribution.py)
    verify_top_k: int = 0
    # Compute only these (hook, layer, position, head) cells, in batches of their own: bit
    # for bit the full sweep's values (the sweep's passes are batch-invariant).
    only: set[tuple[str, int, int | None, int | None]] | None = None

    @property
    def num_cells(self) -> int:
        """Cells of the grid: hooks x layers x positions, times heads for ``attn_head``
        (layers x heads when not ``per_position``)."""
        per_hook = len(self.layers) * len(self.positions)
        heads = len(self.heads or [])
        if not self.per_position:
            by_head = len(self.layers) * heads
            return sum(by_head if h == "attn_head" else per_hook for h in self.hooks)
        return sum(per_hook * (heads if hook == "attn_head" else 1) for hook in self.hooks)


@dataclass
class Cell:
    hook: str
    layer: int
    position: int | None  # None: a head patched at every selected position at once
    head: int | None
    value: float | None = None
    error: str | None = None
    skipped: str | None = None  # why the cell was not computed (its value stays None)
    stderr: float | None = None  # standard error of value over noise samples
    kind: str = "exact"  # or "estimate" (method "attribution")


@dataclass
class SweepOutcome:
    hooks: list[str]
    layers: list[int]
    positions: list[int]
    heads: list[int] | None
    metric: str
    answer: int
    foil: int | None
    grids: dict[str, list[Any]]  # hook -> [layer][position] (attn_head: [layer][position][head])
    argmax: dict[str, Cell | None]  # the most restored cell of each hook (lowest for kl)
    clean: float | None  # raw metric of the clean run (logprob / logit diff for 'recovered')
    corrupt: float  # raw metric of the corrupt run (likewise)
    noise_floor: float  # in the metric's units
    skipped: list[Cell]
    alignment: Alignment | None
    corrupt_logits: torch.Tensor
    corrupt_ids: list[int] = field(default_factory=list)
    stats: dict[str, float | int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)
    foil_ids: list[int] | None = None
    per_position: bool = True
    stderr: dict[str, list[Any]] | None = None  # noise: standard error of each cell's mean
    corrupt_stderr: float | None = None  # noise: of the corrupt baseline's mean
    method: str = "exact"
    kinds: dict[str, list[Any]] | None = None  # hook -> grid of "exact" / "estimate" (attribution)


def window_layers(layer: int, window: int, num_layers: int) -> list[int]:
    """The layers a cell at ``layer`` restores: ROME's ``max(0, l - w//2) .. min(L, l - (-w//2))``
    (exclusive), i.e. ``l - w//2 .. l + (w-1)//2`` clipped to the model."""
    return list(range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2))))


def cell_key(cell: Cell) -> tuple[str, int, int | None, int | None]:
    return (cell.hook, cell.layer, cell.position, cell.head)


def assemble_grids(
    spec: SweepSpec, cells: list[Cell]
) -> tuple[dict[str, list[Any]], dict[str, Cell | None]]:
    """Each hook's grid and most restored cell, from the cells in planning order."""
    grids: dict[str, list[Any]] = {}
    best: dict[str, Cell | None] = {}
    for hook in spec.hooks:
        heads = spec.heads if hook == "attn_head" else None
        own = (c for c in cells if c.hook == hook)
        grids[hook], best[hook] = assemble_grid(
            own, spec.layers, spec.positions, heads, spec.metric, spec.per_position
        )
    return grids, best


def run_sweep(
    model: Transformer,
    spec: SweepSpec,
    on_cell: Callable[[Cell, int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    gate: Callable[[], AbstractContextManager[None]] | None = None,
) -> SweepOutcome:
    """Run a sweep; ``on_cell(cell, done, total)`` fires once per cell as it is graded.

    ``cancel()`` is polled before every batch and between transformer blocks;
    ``gate()`` is entered around every model call (a server's fair scheduler).
    """
    runner: SweepRunner | AttributionRunner
    if spec.method == "exact":
        from patchserve.engine.sweep_runner import SweepRunner

        runner = SweepRunner(model, spec, on_cell, cancel, gate)
    else:
        from patchserve.engine.attribution import AttributionRunner

        runner = AttributionRunner(model, spec, on_cell, cancel, gate)
    if cancel is None:
        return runner.run()
    with cancel_scope(cancel):  # also checked inside each forward, between blocks
        try:
            return runner.run()
        except SweepCancelled:
            raise
        except Cancelled as exc:
            raise SweepCancelled("sweep cancelled") from exc
