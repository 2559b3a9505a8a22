"""Parsing and validating the axes of a study: hooks, layers, heads (torch-free).

The server's engine and the client's per-cell path read a request's axes with
these same functions, so both accept and reject exactly the same spellings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchserve.errors import InvalidArgument
from patchserve.wire.hooks import HOOKS, hook_suggestion


def parse_layers(spec: Any, num_layers: int, param: str = "layers") -> list[int]:
    """``"all"``, a list of ints, or ``{"start", "stop", "step"}`` → layer indices."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, dict):
        extra = set(spec) - {"start", "stop", "step"}
        if extra:
            raise InvalidArgument(
                f"unknown layer range field(s): {', '.join(sorted(extra))}", param
            )
        start, stop, step = spec.get("start", 0), spec.get("stop", num_layers), spec.get("step", 1)
        for key, value in (("start", start), ("stop", stop), ("step", step)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgument(f"layer range {key} must be an integer", param)
        if step <= 0:
            raise InvalidArgument("layer range step must be positive", param)
        if not (0 <= start < num_layers and start < stop <= num_layers):
            raise InvalidArgument(
                f"layer range [{start}, {stop}) is outside the model's {num_layers} layers", param
            )
        return list(range(start, stop, step))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        layers: list[int] = []
        for layer in spec:
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise InvalidArgument(f"layers must be integers, got {layer!r}", param)
            if not 0 <= layer < num_layers:
                raise InvalidArgument(
                    f"layer {layer} is out of range; the model has {num_layers} layers (0-"
                    f"{num_layers - 1})",
                    param,
                )
            layers.append(layer)
        if not layers:
            raise InvalidArgument("layers is empty", param)
        return list(dict.fromkeys(layers))
    raise InvalidArgument(f"layers must be 'all', a list or a range object, got {spec!r}", param)


def parse_hooks(hook: Any, hooks: Any) -> list[str]:
    chosen = hooks if hooks is not None else [hook if hook is not None else "post_block"]
    if isinstance(chosen, str) or not isinstance(chosen, Sequence) or not chosen:
        raise InvalidArgument("hooks must be a non-empty list of hook names", "hooks")
    for name in chosen:
        if name not in HOOKS:
            suggestion = hook_suggestion(name) if isinstance(name, str) else None
            hint = f" ({suggestion})" if suggestion else ""
            raise InvalidArgument(
                f"unknown hook {name!r}; expected one of {', '.join(HOOKS)}{hint}",
                "hooks" if hooks is not None else "hook",
            )
    return list(dict.fromkeys(chosen))


def parse_heads(spec: Any, num_heads: int) -> list[int]:
    if spec is None or spec == "all":
        return list(range(num_heads))
    if isinstance(spec, Sequence) and not isinstance(spec, str) and spec:
        for head in spec:
            if not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < num_heads:
                raise InvalidArgument(
                    f"head {head!r} is out of range; the model has {num_heads} query heads",
                    "heads",
                )
        return list(dict.fromkeys(spec))
    raise InvalidArgument("heads must be 'all' or a non-empty list of head indices", "heads")


def not_one_token(param: str, text: str, ids: list[int], spaced_ids: list[int] | None) -> str:
    """Why ``text`` cannot be an answer or foil, and what would be: ``spaced_ids`` are the ids
    of ``" " + text`` (None when ``text`` already starts with a space)."""
    message = f"{param} {text!r} must be exactly one token; it tokenizes to {len(ids)} tokens {ids}"
    if spaced_ids is not None and len(spaced_ids) == 1:
        return f"{message}. Did you mean {' ' + text!r} (one token, id {spaced_ids[0]})?"
    return (
        f"{message}, and is not one token with a leading space either: pass {param}_id, or "
        "grade a token that is one in this model's vocabulary (see /tokenize)"
    )
