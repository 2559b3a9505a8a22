"""SmolLM3: Llama's layout and tensor names, with rotary on some layers only
(``no_rope_layers[i]`` is 1 where layer ``i`` uses rope, 0 for a NoPE layer) and an
optional sliding window on the ``sliding_attention`` layers."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from patchserve.models.config import CheckpointError, ModelConfig
from patchserve.models.families import llama
from patchserve.models.families.base import Family


def _uses_rope(raw: dict[str, Any], layers: int) -> list[bool]:
    """Per layer, whether it is rotary: ``no_rope_layers``, else every
    ``no_rope_layer_interval``-th layer is NoPE (``SmolLM3Config``'s default)."""
    flags = raw.get("no_rope_layers")
    if flags is None:
        interval = raw.get("no_rope_layer_interval", 4)
        return [(i + 1) % interval != 0 for i in range(layers)]
    if len(flags) != layers:
        raise CheckpointError("config.json no_rope_layers does not have one entry per layer")
    return [bool(f) for f in flags]


def _windows(raw: dict[str, Any], rotary: list[bool]) -> tuple[int | None, ...]:
    """Sliding window of the ``sliding_attention`` layers (``layer_types``, else
    ``SmolLM3Config``'s default: the NoPE layers, when ``use_sliding_window``)."""
    window, enabled = raw.get("sliding_window"), bool(raw.get("use_sliding_window", False))
    types = raw.get("layer_types")
    if types is None:
        on = enabled and window is not None
        types = ["sliding_attention" if on and not r else "full_attention" for r in rotary]
    if len(types) != len(rotary):
        raise CheckpointError("config.json layer_types does not have one entry per layer")
    sliding = "sliding_attention" in types
    if sliding and not (enabled and window):
        # Eager/SDPA would mask by layer_types, flash attention by use_sliding_window.
        raise CheckpointError(
            "config.json layer_types has sliding_attention layers but use_sliding_window "
            f"is {enabled} and sliding_window {window!r}: transformers' attention "
            "implementations disagree on such a model"
        )
    return tuple(window if t == "sliding_attention" else None for t in types)


def read_config(raw: dict[str, Any], architecture: str) -> ModelConfig:
    cfg = llama.read_config({**raw, "layer_types": None, "sliding_window": None}, architecture)
    rotary = _uses_rope(raw, cfg.num_layers)
    return replace(
        cfg,
        family="smollm3",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        rope=tuple(rope if r else None for rope, r in zip(cfg.rope, rotary, strict=True)),
        sliding_windows=_windows(raw, rotary),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
    )


FAMILY = Family(
    name="smollm3",
    architectures=("SmolLM3ForCausalLM",),
    read_config=read_config,
    map_tensor=llama.map_tensor,
)
