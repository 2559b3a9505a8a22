"""``architectures`` in ``config.json`` → the family that implements it."""

from __future__ import annotations

from typing import Any

from patchserve.models.config import CheckpointError
from patchserve.models.families import (
    bloom,
    cohere,
    falcon,
    gemma,
    gpt2,
    gpt_neo,
    gpt_neox,
    gptj,
    granite,
    llama,
    moe,
    olmo,
    opt,
    phi,
    phi3,
    smollm3,
    stablelm,
    starcoder2,
)
from patchserve.models.families.base import Family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    granite.FAMILY,
    smollm3.FAMILY,
    phi3.FAMILY,
    moe.FAMILY,
    gpt2.FAMILY,
    gpt_neo.FAMILY,
    gpt_neox.FAMILY,
    gemma.FAMILY,
    olmo.FAMILY,
    gptj.FAMILY,
    cohere.FAMILY,
    phi.FAMILY,
    stablelm.FAMILY,
    starcoder2.FAMILY,
    opt.FAMILY,
    bloom.FAMILY,
    falcon.FAMILY,
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
