"""``architectures`` in ``config.json`` → the family that implements it."""

from __future__ import annotations

from typing import Any

from patchserve.models.config import CheckpointError
from patchserve.models.families import gemma, gpt2, gpt_neox, llama, moe
from patchserve.models.families.base import Family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    gpt2.FAMILY,
    gpt_neox.FAMILY,
    gemma.FAMILY,
    moe.FAMILY,
)
REGISTRY: dict[str, Family] = {arch: f for f in FAMILIES for arch in f.architectures}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(REGISTRY))


def family_for(raw: dict[str, Any]) -> tuple[Family, str]:
    """The family of a parsed ``config.json`` and the architecture name it matched."""
    architectures = raw.get("architectures") or []
    for arch in architectures:
        if arch in REGISTRY:
            return REGISTRY[arch], arch
    found = ", ".join(architectures) or f"none (model_type {raw.get('model_type')!r})"
    raise CheckpointError(
        f"unsupported architecture: {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
