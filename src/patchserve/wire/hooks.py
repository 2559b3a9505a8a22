"""Hook names (SPEC §1), torch-free so that the client can use them too."""

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
