"""Hook and metric names (docs/api.md §1), torch-free so that the client can use them too."""

from __future__ import annotations

HOOKS: tuple[str, ...] = (
    "pre_attn",
    "attn_out",
    "post_attn",
    "mlp_in",
    "mlp_out",
    "post_block",
    "attn_head",
)
RESIDUAL_HOOKS: tuple[str, ...] = HOOKS[:-1]
INJECTABLE_HOOKS: tuple[str, ...] = HOOKS

# The same activations in TransformerLens (``blocks.{layer}.`` + name).
TRANSFORMER_LENS_NAMES: dict[str, str] = {
    "pre_attn": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "post_attn": "hook_resid_mid",
    "mlp_in": "ln2.hook_normalized",
    "mlp_out": "hook_mlp_out",
    "post_block": "hook_resid_post",
    "attn_head": "attn.hook_z",
}

# Metrics of a sweep (docs/api.md §1 *Metrics*); for those in LOWER_IS_BETTER the most
# restored cell is the one with the lowest value.
METRICS: tuple[str, ...] = ("logprob", "prob", "logit_diff", "recovered", "kl")
LOWER_IS_BETTER: frozenset[str] = frozenset({"kl"})

_FROM_TRANSFORMER_LENS: dict[str, str] = {
    tl.removeprefix("attn.").removeprefix("ln2.").removeprefix("hook_"): ours
    for ours, tl in TRANSFORMER_LENS_NAMES.items()
}


def from_transformer_lens(name: str) -> tuple[str, int | None] | None:
    """``(hook, layer)`` of a TransformerLens activation name, or None if it is not one.

    Accepts the full name (``blocks.3.hook_resid_post``), the name without the
    block (``hook_resid_post``, ``attn.hook_z``) and ``utils.get_act_name``'s
    short form (``resid_post``, ``z``); ``layer`` is None when the name has no block.
    """
    layer: int | None = None
    rest = name.strip()
    parts = rest.split(".", 2)
    if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
        layer, rest = int(parts[1]), parts[2]
    short = rest.removeprefix("attn.").removeprefix("ln2.").removeprefix("hook_")
    hook = _FROM_TRANSFORMER_LENS.get(short)
    return None if hook is None else (hook, layer)


def hook_suggestion(name: str) -> str | None:
    """What to write instead of a TransformerLens name, in words (None if it is not one)."""
    found = from_transformer_lens(name)
    if found is None:
        return None
    hook, layer = found
    if layer is None:
        return f"{name!r} is TransformerLens' name for hook {hook!r}: pass hook={hook!r}"
    return (
        f"{name!r} is TransformerLens' name for hook {hook!r} at layer {layer}: "
        f"pass hook={hook!r} and layers=[{layer}]"
    )
