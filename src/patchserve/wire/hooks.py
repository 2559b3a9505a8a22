"""Hook and metric names (SPEC §1), torch-free so that the client can use them too."""

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

# Metrics of a sweep (SPEC §1 *Metrics*); for those in LOWER_IS_BETTER the most
# restored cell is the one with the lowest value.
METRICS: tuple[str, ...] = ("logprob", "prob", "logit_diff", "recovered", "kl")
LOWER_IS_BETTER: frozenset[str] = frozenset({"kl"})
