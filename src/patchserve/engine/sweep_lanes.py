"""The sweep's corrupt forward and its answer lanes: what every cell resumes from.

The corrupt prompt runs once, capturing the residual stream entering every
block from the first swept one on, the swept sites' activations (and the
corrupt ``attn_out`` a branch site reuses) and the key/value cache. A
multi-token answer appends a tail per lane (``engine/continuation.py``),
computed on the prompt's cache so that the prompt's own activations stay bit
for bit those of the prompt's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from patchserve.engine.sweep import SweepSpec, window_layers
from patchserve.models import HookContext, Transformer
from patchserve.models.state import KVCache

BRANCH_HOOKS = ("attn_out", "post_attn", "mlp_in", "mlp_out")
Gate = Callable[[], AbstractContextManager[None]]


@dataclass
class CorruptLane:
    """What the corrupt forward of one lane (the prompt plus a tail) leaves for the cells."""

    captured: dict[tuple[int, str], torch.Tensor]
    kv: KVCache
    logits: torch.Tensor  # [k, vocab] at the read positions (last prompt token, the tail)
    final: torch.Tensor  # [tokens, d] residual leaving the last block
    length: int  # prompt + tail tokens

    @property
    def reads(self) -> int:
        return self.logits.shape[0]


def capture_sites(spec: SweepSpec, num_layers: int) -> set[tuple[int, str]]:
    """The corrupt activations the cells resume from or patch over."""
    sites: set[tuple[int, str]] = set()
    layers = {w for layer in spec.layers for w in window_layers(layer, spec.window, num_layers)}
    sites.update((layer, "pre_attn") for layer in range(min(layers), num_layers))
    for hook in spec.hooks:
        sites.update((layer, hook) for layer in layers)
        if hook in BRANCH_HOOKS:
            sites.update((layer, "attn_out") for layer in layers)
    return sites


def corrupt_forward(model: Transformer, spec: SweepSpec, gate: Gate) -> CorruptLane:
    """The corrupt prompt once: captures, key/value cache, last-position logits."""
    ids = torch.tensor([spec.corrupt_ids], device=model.device)
    with gate():
        sites = capture_sites(spec, model.cfg.num_layers)
        hooks = HookContext.build(spec.corrupt_edits, capture=sites)
        out = model.prefill(ids, hooks)
    return CorruptLane(out.captured, out.cache, out.logits, out.hidden[0], ids.shape[1])


def lane_forward(
    model: Transformer, spec: SweepSpec, gate: Gate, base: CorruptLane, tail: list[int]
) -> CorruptLane:
    """The corrupt run with ``tail`` appended: the tail alone on the prompt's cache, so
    the prompt's activations stay bit for bit those of the prompt's own forward (cells
    they leave unchanged stay free). Resumed rows attend to the cache of the prompt
    only (positions before their first patch); the tail's own keys are recomputed."""
    if not tail:
        return base
    ids = torch.tensor([tail], device=model.device)
    with gate():
        sites = capture_sites(spec, model.cfg.num_layers)
        out = model.extend(ids, base.kv, HookContext.build(capture=sites))
        tail_logits = model.unembed(out.hidden[0])
    captured = {k: torch.cat([v, out.captured[k]], dim=1) for k, v in base.captured.items()}
    logits = torch.cat([base.logits, tail_logits])
    final = torch.cat([base.final, out.hidden[0]])
    return CorruptLane(captured, base.kv, logits, final, base.length + len(tail))


def clean_lane(
    model: Transformer, gate: Gate, clean_ids: list[int], tail: list[int]
) -> torch.Tensor:
    """Logits ``[1, k, vocab]`` of the clean prompt plus ``tail`` at the read positions."""
    ids = torch.tensor([clean_ids + tail], device=model.device)
    with gate():
        logits: torch.Tensor = model(ids)
    return logits[:, len(clean_ids) - 1 :]
