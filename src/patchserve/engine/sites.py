"""The one check of a site against the model — layer, hook and head in range — used by the
sweep's preparation, the generation's patches and steering, and the module registry."""

from __future__ import annotations

from patchserve.engine.errors import InvalidArgument
from patchserve.models import HOOKS, ModelConfig


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON's true is no layer number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_layer(cfg: ModelConfig, layer: object, param: str) -> int:
    """``layer`` as an index of one of the model's blocks."""
    n = cfg.num_layers
    if not is_int(layer) or not 0 <= layer < n:  # type: ignore[operator]
        raise InvalidArgument(
            f"layer {layer!r} is out of range; the model has {n} layers (0-{n - 1})", param
        )
    assert isinstance(layer, int)
    return layer


def check_site(cfg: ModelConfig, layer: object, hook: object, head: object, param: str) -> int:
    """The width of site ``(layer, hook[, head])``; ``head`` is given for ``attn_head`` only."""
    if hook not in HOOKS:
        raise InvalidArgument(f"unknown hook {hook!r}; expected one of {', '.join(HOOKS)}", param)
    check_layer(cfg, layer, param)
    if (hook == "attn_head") != (head is not None):
        raise InvalidArgument("a head is given for the attn_head hook, and only for it", param)
    if head is not None and (not is_int(head) or not 0 <= head < cfg.num_heads):  # type: ignore[operator]
        raise InvalidArgument(
            f"head {head!r} is out of range; the model has {cfg.num_heads} query heads "
            f"(0-{cfg.num_heads - 1})",
            param,
        )
    return cfg.hook_width(str(hook))
