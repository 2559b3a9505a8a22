"""The readable reference forward equals ``transformers``, and the optimised runtime equals it."""

from __future__ import annotations

import torch

from checkpoints import load_reference
from models.helpers import OTHER, ids_of, loaded
from patchserve.models import HOOKS, HookContext, make_edit
from patchserve.models.reference import reference_forward

TOL = 1e-4


def test_reference_equals_transformers(family_checkpoint):
    ids = ids_of(family_checkpoint)
    with torch.inference_mode():
        expected = load_reference(family_checkpoint)(ids).logits
    logits, captured = reference_forward(loaded(family_checkpoint).model, ids)
    assert (logits - expected).abs().max().item() < TOL
    n = loaded(family_checkpoint).model.cfg.num_layers
    assert {hook for (_, hook) in captured} == set(HOOKS) and len(captured) == n * len(HOOKS)


def test_runtime_equals_the_reference_at_every_site(family_checkpoint):
    model = loaded(family_checkpoint).model
    ids = ids_of(family_checkpoint)
    expected_logits, expected = reference_forward(model, ids)
    sites = [(layer, hook) for layer in range(model.cfg.num_layers) for hook in HOOKS]
    with torch.inference_mode():
        ctx = HookContext.build(capture=sites)
        logits = model(ids, ctx)
    assert (logits - expected_logits).abs().max().item() < TOL
    for site in sites:
        assert (ctx.captured[site] - expected[site]).abs().max().item() < TOL, site


def test_runtime_patches_equal_reference_patches(family_checkpoint):
    """A patch at each hook changes the runtime's logits exactly as it changes the reference's
    (``attn_head``: head 0 only)."""
    model = loaded(family_checkpoint).model
    clean, corrupt = ids_of(family_checkpoint), ids_of(family_checkpoint, OTHER)
    _, source = reference_forward(model, clean)
    position, layer = 3, model.cfg.num_layers // 2
    for hook in HOOKS:
        value = source[layer, hook][0, position]
        if hook == "attn_head":
            value = value[0]

        def write(at: int, name: str, x: torch.Tensor, hook: str = hook, value=value):
            if (at, name) != (layer, hook):
                return x
            x = x.clone()
            if hook == "attn_head":
                x[0, position, 0] = value
            else:
                x[0, position] = value
            return x

        expected, _ = reference_forward(model, corrupt, write)
        heads = [0] if hook == "attn_head" else None
        edit = make_edit(layer, hook, [0], [position], value[None], heads=heads)
        with torch.inference_mode():
            got = model.prefill(corrupt, HookContext.build([edit])).logits
        assert (got[0] - expected[0, -1]).abs().max().item() < TOL, hook
