"""Parsing and validating the axes of a study: layers, heads, answer tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchserve.engine.errors import RequestError
from patchserve.models.hooks import HOOKS
from patchserve.text.tokenizer import Tokenizer


def parse_layers(spec: Any, num_layers: int, param: str = "layers") -> list[int]:
    """``"all"``, a list of ints, or ``{"start", "stop", "step"}`` → layer indices."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, dict):
        extra = set(spec) - {"start", "stop", "step"}
        if extra:
            raise RequestError(f"unknown layer range field(s): {', '.join(sorted(extra))}", param)
        start, stop, step = spec.get("start", 0), spec.get("stop", num_layers), spec.get("step", 1)
        for key, value in (("start", start), ("stop", stop), ("step", step)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise RequestError(f"layer range {key} must be an integer", param)
        if step <= 0:
            raise RequestError("layer range step must be positive", param)
        if not (0 <= start < num_layers and start < stop <= num_layers):
            raise RequestError(
                f"layer range [{start}, {stop}) is outside the model's {num_layers} layers", param
            )
        return list(range(start, stop, step))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        layers: list[int] = []
        for layer in spec:
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise RequestError(f"layers must be integers, got {layer!r}", param)
            if not 0 <= layer < num_layers:
                raise RequestError(
                    f"layer {layer} is out of range; the model has {num_layers} layers (0-"
                    f"{num_layers - 1})",
                    param,
                )
            layers.append(layer)
        if not layers:
            raise RequestError("layers is empty", param)
        return list(dict.fromkeys(layers))
    raise RequestError(f"layers must be 'all', a list or a range object, got {spec!r}", param)


def parse_hooks(hook: Any, hooks: Any) -> list[str]:
    chosen = hooks if hooks is not None else [hook if hook is not None else "post_block"]
    if isinstance(chosen, str) or not isinstance(chosen, Sequence) or not chosen:
        raise RequestError("hooks must be a non-empty list of hook names", "hooks")
    for name in chosen:
        if name not in HOOKS:
            raise RequestError(
                f"unknown hook {name!r}; expected one of {', '.join(HOOKS)}",
                "hooks" if hooks is not None else "hook",
            )
    return list(dict.fromkeys(chosen))


def parse_heads(spec: Any, num_heads: int) -> list[int]:
    if spec is None or spec == "all":
        return list(range(num_heads))
    if isinstance(spec, Sequence) and not isinstance(spec, str) and spec:
        for head in spec:
            if not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < num_heads:
                raise RequestError(
                    f"head {head!r} is out of range; the model has {num_heads} query heads",
                    "heads",
                )
        return list(dict.fromkeys(spec))
    raise RequestError("heads must be 'all' or a non-empty list of head indices", "heads")


def resolve_token(
    tokenizer: Tokenizer,
    vocab_size: int,
    text: str | None,
    token_id: int | None,
    param: str,
) -> int | None:
    """A token id from ``*_token_id`` (wins) or a string that must be exactly one token."""
    if token_id is not None:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise RequestError(f"{param}_id must be an integer", f"{param}_id")
        if not 0 <= token_id < vocab_size:
            raise RequestError(
                f"{param}_id {token_id} is outside the vocabulary (0-{vocab_size - 1})",
                f"{param}_id",
            )
        return token_id
    if text is None:
        return None
    if not isinstance(text, str) or not text:
        raise RequestError(f"{param} must be a non-empty string", param)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise RequestError(
            f"{param} {text!r} must be exactly one token; it tokenizes to {len(ids)} tokens "
            f"{ids}. Pass {param}_id, or include the leading space (e.g. ' Paris')",
            param,
        )
    return ids[0]
