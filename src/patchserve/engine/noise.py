"""ROME-style noise corruption: the corrupt run is the clean prompt with Gaussian noise
added to the subject's token embeddings, one sample per seed, each cell averaged.

The noise of sample ``s`` is ``scale * σ * N(0, 1)`` of shape ``[span tokens, width]``,
drawn on the CPU from ``torch.Generator().manual_seed(seed + s)`` in float32 and
then moved to the model's device, so a seed gives the same noise everywhere.
``σ`` is the standard deviation of the embedding matrix, in the units of the
residual stream entering block 0 (times the family's embedding scale); the
noise is added there (``pre_attn`` of layer 0, after any learned positions —
adding is position-independent, so this equals noising the token embeddings
as ROME's ``trace_with_patch`` does). The clean source is the clean run of the
same tokens, so positions pair one to one.

A cell's value is the mean of its metric over the samples; ``stderr`` is the
standard error of that mean (sample standard deviation / √samples; 0 for one
sample). Cells stream once, when the last sample grades them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

import torch

from patchserve.engine.sweep import Cell, SweepOutcome, SweepSpec, run_sweep
from patchserve.models import Transformer, make_edit
from patchserve.models.hooks import SiteEdit
from patchserve.wire.grids import assemble_grid
from patchserve.wire.sweep import NoiseSummary

MAX_SAMPLES = 256


@dataclass(frozen=True)
class Noise:
    """Noise on the token embeddings of ``positions`` (the subject)."""

    positions: list[int]
    scale: float = 3.0
    samples: int = 10
    seed: int = 0


def embedding_std(model: Transformer) -> float:
    """σ of the embedding matrix, in the residual stream's units (times the embedding scale;
    through ``project_in`` where the embedding is narrower than the residual, as in OPT-350m)."""
    weight = model.embed_tokens.weight.detach()
    if model.project_in is not None:
        with torch.no_grad():
            weight = model.project_in(weight)
    std = float(weight.double().std())
    scale = model.cfg.embed_scale
    return std * abs(float(scale)) if scale is not None else std


def noise_tensor(model: Transformer, noise: Noise, sample: int) -> torch.Tensor:
    """The float32 noise ``[span tokens, width]`` of one sample (on the CPU)."""
    generator = torch.Generator(device="cpu").manual_seed(noise.seed + sample)
    shape = (len(noise.positions), model.cfg.hidden_size)
    z = torch.randn(shape, generator=generator, dtype=torch.float32)
    return z * (noise.scale * embedding_std(model))


def noise_edit(model: Transformer, noise: Noise, sample: int) -> SiteEdit:
    """The additive edit at ``pre_attn`` of layer 0 that corrupts one sample."""
    z = noise_tensor(model, noise, sample).to(model.device_of(0))
    return make_edit(0, "pre_attn", [0] * len(noise.positions), noise.positions, z, kind="add")


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def run_noised(
    model: Transformer,
    spec: SweepSpec,
    noise: Noise,
    on_cell: Callable[[Cell, int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    gate: Callable[[], AbstractContextManager[None]] | None = None,
) -> SweepOutcome:
    """One sweep per noise sample; every cell (and the corrupt baseline) averaged."""
    values: dict[tuple[str, int, int | None, int | None], list[float]] = {}
    outcomes: list[SweepOutcome] = []
    for sample in range(noise.samples):
        last = sample == noise.samples - 1

        def collect(cell: Cell, done: int, total: int, last: bool = last) -> None:
            key = (cell.hook, cell.layer, cell.position, cell.head)
            if cell.value is not None:
                values.setdefault(key, []).append(cell.value)
            if last and on_cell is not None:
                on_cell(_averaged(cell, values.get(key)), done, total)

        sample_spec = replace(spec, corrupt_edits=[noise_edit(model, noise, sample)])
        outcomes.append(run_sweep(model, sample_spec, collect, cancel, gate))
    return _combine(spec, outcomes, values)


def _averaged(cell: Cell, values: list[float] | None) -> Cell:
    if not values:
        return replace(cell)
    mean, stderr = mean_stderr(values)
    return replace(cell, value=mean, stderr=stderr)


def _combine(
    spec: SweepSpec,
    outcomes: list[SweepOutcome],
    values: dict[tuple[str, int, int | None, int | None], list[float]],
) -> SweepOutcome:
    first = outcomes[0]
    cells = [_averaged(Cell(*key), found) for key, found in values.items()]
    grids: dict[str, list[Any]] = {}
    stderr: dict[str, list[Any]] = {}
    argmax: dict[str, Cell | None] = {}
    for hook in spec.hooks:
        heads = first.heads if hook == "attn_head" else None
        own = [c for c in cells if c.hook == hook]
        grids[hook], argmax[hook] = assemble_grid(
            own, spec.layers, spec.positions, heads, spec.metric, spec.per_position
        )
        errors = [replace(c, value=c.stderr) for c in own]
        stderr[hook], _ = assemble_grid(
            errors, spec.layers, spec.positions, heads, spec.metric, spec.per_position
        )
    probs = torch.stack([o.corrupt_logits.double().softmax(-1) for o in outcomes]).mean(0)
    stats = {k: sum(o.stats.get(k, 0) for o in outcomes) for k in ("computed", "free", "batches")}
    stats.update(cells=first.stats["cells"], flops=sum(o.stats["flops"] for o in outcomes))
    seconds = sum(float(o.stats["seconds"]) for o in outcomes)
    stats.update(seconds=seconds, cells_per_second=stats["cells"] / seconds if seconds else 0.0)
    corrupt, corrupt_stderr = mean_stderr([o.corrupt for o in outcomes])
    return replace(
        first,
        grids=grids,
        argmax=argmax,
        corrupt=corrupt,
        noise_floor=max(o.noise_floor for o in outcomes),
        corrupt_logits=probs.log().float(),
        stats=stats,
        stderr=stderr,
        corrupt_stderr=corrupt_stderr,
    )


def noise_summary(model: Transformer, noise: Noise, corrupt_stderr: float | None) -> NoiseSummary:
    return NoiseSummary(
        positions=noise.positions,
        scale=noise.scale,
        sigma=noise.scale * embedding_std(model),
        samples=noise.samples,
        seed=noise.seed,
        corrupt_stderr=corrupt_stderr or 0.0,
    )
