"""A study's vector source (``source_module`` / ``source_inline``) and masks, validated (4xx).

A vector-sourced sweep writes one vector per ``(hook, layer)`` instead of a
clean run's activations: a named module of the vector library, or a row of the
request's ``patch_vectors``. It has exactly one source, so a ``source_run`` or
a ``clean_prompt`` beside it is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from patchserve.engine.errors import InvalidArgument
from patchserve.engine.sweep import SweepSpec, VectorSource
from patchserve.engine.vectors import mask_vector, table_row
from patchserve.models import Transformer
from patchserve.wire.requests import MaskSpec, PatchSweepRequest

if TYPE_CHECKING:
    from patchserve.engine.service import VectorLibrary


def vector_source(
    req: PatchSweepRequest,
    model: Transformer,
    vectors: VectorLibrary,
    hooks: list[str],
    table: np.ndarray | None,
) -> VectorSource | None:
    """The request's vector source, or None when it patches from a clean run."""
    if req.source_module is None and req.source_inline is None:
        return None
    if req.source_module is not None and req.source_inline is not None:
        raise InvalidArgument("give one of source_module and source_inline", "source_module")
    if req.source_run is not None:
        raise InvalidArgument(
            "a sweep has one source: source_run or source_module/source_inline", "source_run"
        )
    if req.clean_prompt is not None:
        raise InvalidArgument(
            "clean_prompt has no use in a vector-sourced sweep (source_module/source_inline); "
            "drop it, or drop the vector source to patch from the clean run",
            "clean_prompt",
        )
    like = model.embed_tokens.weight
    if req.source_module is not None:
        name = req.source_module
        if not vectors.exists(name):
            raise InvalidArgument(f"unknown module {name!r}", "source_module")
        return VectorSource(
            name,
            lambda hook, layer: vectors.vector(name, hook, layer, model.cfg.hook_width(hook), like),
        )
    assert req.source_inline is not None
    row = table_row(table, req.source_inline, None, "source_inline")
    for hook in hooks:
        width = model.cfg.hook_width(hook)
        if row.shape[0] != width:
            raise InvalidArgument(
                f"source_inline is {row.shape[0]} wide; hook {hook} is {width} wide",
                "source_inline",
            )
    vector = torch.from_numpy(row.copy()).to(device=like.device, dtype=like.dtype)
    return VectorSource("inline", lambda hook, layer: vector)


def check_module_covers(
    vectors: VectorLibrary, model: Transformer, spec: SweepSpec, name: str
) -> None:
    """Every swept site has a vector in module ``name`` (only the swept layers)."""
    like, cfg = model.embed_tokens.weight, model.cfg
    for hook in spec.hooks:
        for layer in spec.layers:
            vectors.vector(name, hook, layer, cfg.hook_width(hook), like)


def sweep_masks(
    mask: MaskSpec | None, model: Transformer, hooks: list[str], table: np.ndarray | None
) -> dict[str, torch.Tensor] | None:
    """Each swept hook's per-dimension mask (None: no mask)."""
    if mask is None:
        return None
    width = model.cfg.hook_width
    return {
        hook: mask_vector(mask.indices, mask.inline, width(hook), table, "mask", f"hook {hook}")
        for hook in hooks
    }
