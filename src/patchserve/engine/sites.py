"""The one check of a site against the model — layer, hook and head in range — used by the
sweep's preparation, the generation's patches and steering, and the module registry; and of
a prompt's length against the model's context."""

from __future__ import annotations

from patchserve.engine.errors import InvalidArgument
from patchserve.models import HOOKS, ModelConfig, Transformer
from patchserve.models.hooks import hook_unavailable
from patchserve.models.layers import position_limit


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON's true is no layer number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_context(cfg: ModelConfig, count: int, param: str) -> None:
    """A prompt of ``count`` tokens stays within the positions the model computes exactly
    (a learned position table's rows, LongRoPE's original context; rotary models have no
    such limit): past them a sweep or capture is refused, never approximated."""
    limit = position_limit(cfg)
    if limit is not None and count > limit:
        raise InvalidArgument(
            f"{param} has {count} tokens, more than the model's context of {limit}", param
        )


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


def check_offered(model: Transformer, hook: object, param: str) -> None:
    """A known hook that the model's runtime does not provide exactly: a 400 naming the hooks
    it has (the transformers runtime offers what its module tree gives, models/generic/)."""
    if hook in HOOKS and hook not in model.offered_hooks:
        raise InvalidArgument(
            hook_unavailable(str(hook), model.runtime, model.offered_hooks), param
        )


def check_runtime_scope(model: Transformer, method: str, noise: bool) -> None:
    """What only the native runtime computes: attribution (its batch-invariant verification
    and gradients) and noise corruption (embedding-scale units) — refused, never
    approximated, on the transformers runtime."""
    if model.runtime == "native":
        return
    for refused, what, param in (
        (method != "exact", f"method {method!r}", "method"),
        (noise, "noise corruption", "corruption"),
    ):
        if refused:
            raise InvalidArgument(
                f"{what} is not supported by the {model.runtime} runtime that serves this "
                "model; use method 'exact' with a clean prompt or run",
                param,
            )
