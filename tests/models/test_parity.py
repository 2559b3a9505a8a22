"""Logits and activations of every family equal ``transformers``' on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from checkpoints import branch_scale, load_reference, reference_modules, submodule
from models.helpers import DEVICES, ids_of, loaded
from patchserve.models import HookContext
from patchserve.models.hooks import RESIDUAL_HOOKS

TOL = 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_logits_match_transformers(family_checkpoint, device):
    ids = ids_of(family_checkpoint, device=device)
    ref = load_reference(family_checkpoint).to(device)
    ours = loaded(family_checkpoint, device).model
    with torch.inference_mode():
        expected = ref(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("split", [1, 7, 15])
def test_cache_split_matches_transformers(family_checkpoint, split):
    ids = ids_of(family_checkpoint)
    ref = load_reference(family_checkpoint)
    ours = loaded(family_checkpoint).model
    with torch.inference_mode():
        expected = ref(ids).logits
        prefix = ours.prefill(ids[:, :split])
        suffix = ours.extend(ids[:, split:], prefix.cache)
        full = ours(ids)
        prefix_logits, suffix_logits = ours.unembed(prefix.hidden), ours.unembed(suffix.hidden)
    got = torch.cat((prefix_logits, suffix_logits), dim=1)
    assert (got - expected).abs().max().item() < TOL
    assert (suffix_logits - full[:, split:]).abs().max().item() < 1e-5


def _reference_branch_outputs(ref, family: str) -> tuple[list, dict]:
    """Forward hooks on the transformers model that record each block's branch outputs."""
    records: dict[tuple[int, str], torch.Tensor] = {}
    blocks, attn, mlp = reference_modules(ref, family)
    handles = []
    for i, block in enumerate(blocks):
        for hook, name in (("attn_out", attn), ("mlp_out", mlp)):

            def record(_m, _inp, out, key=(i, hook)):
                # a clone: Falcon adds the attention output to its MLP output in place
                records[key] = (out[0] if isinstance(out, tuple) else out).clone()

            handles.append(submodule(block, name).register_forward_hook(record))
    return handles, records


def test_captures_match_transformers(family_checkpoint):
    family = family_checkpoint.name
    ids = ids_of(family_checkpoint)
    ref = load_reference(family_checkpoint)
    ours = loaded(family_checkpoint).model
    n = ours.cfg.num_layers
    handles, branch = _reference_branch_outputs(ref, family)
    scale = branch_scale(ref, family)
    with torch.inference_mode():
        out = ref(ids, output_hidden_states=True)
        for h in handles:
            h.remove()
        ctx = HookContext.build(capture=[(i, h) for i in range(n) for h in RESIDUAL_HOOKS])
        res = ours.prefill(ids, ctx)
    hs = out.hidden_states
    cap = res.captured
    for layer in range(n):
        assert (cap[layer, "pre_attn"] - hs[layer]).abs().max() < TOL
        if layer < n - 1:
            assert (cap[layer, "post_block"] - hs[layer + 1]).abs().max() < TOL
        for hook in ("attn_out", "mlp_out"):
            expected = branch[layer, hook] * scale
            assert (cap[layer, hook] - expected).abs().max() < TOL, (layer, hook)
        # Exact identities of the residual stream (post-LN: of its normalised sums).
        block = ours.blocks[layer]
        post_ln = ours.cfg.post_ln_residual
        mid = cap[layer, "pre_attn"] + cap[layer, "attn_out"]
        end = cap[layer, "post_attn"] + cap[layer, "mlp_out"]
        assert torch.equal(cap[layer, "post_block"], block.mlp_norm(end) if post_ln else end)
        assert torch.equal(cap[layer, "post_attn"], block.attn_norm(mid) if post_ln else mid)
    # transformers' last hidden state is after the final norm (and OPT's project_out); ours
    # is before them.
    final = ours.final_norm(cap[n - 1, "post_block"])
    if ours.project_out is not None:
        final = ours.project_out(final)
    assert (final - hs[n]).abs().max() < TOL
    assert torch.equal(res.hidden, cap[n - 1, "post_block"])


def test_attn_heads_project_to_attn_out(family_checkpoint):
    ids = ids_of(family_checkpoint)
    model = loaded(family_checkpoint).model
    cfg = model.cfg
    n = cfg.num_layers
    ctx = HookContext.build(capture=[(i, h) for i in range(n) for h in ("attn_head", "attn_out")])
    with torch.inference_mode():
        model(ids, ctx)
    cap = ctx.captured
    for layer, block in enumerate(model.blocks):
        z = cap[layer, "attn_head"]
        assert z.shape == (1, ids.shape[1], cfg.num_heads, cfg.head_dim)  # query heads (GQA)
        w = block.attn.o_proj.weight.view(cfg.hidden_size, cfg.num_heads, cfg.head_dim)
        per_head = torch.einsum("bthd,ehd->bthe", z, w)  # each head's write into the residual
        total = per_head.sum(dim=2)
        if block.attn.o_proj.bias is not None:
            total = total + block.attn.o_proj.bias
        if block.attn_post_norm is not None:
            total = block.attn_post_norm(total)
        if cfg.residual_multiplier is not None:
            total = total * cfg.residual_multiplier
        assert (total - cap[layer, "attn_out"]).abs().max() < TOL


def test_mlp_in_is_the_normalised_residual(family_checkpoint):
    ids = ids_of(family_checkpoint)
    model = loaded(family_checkpoint).model
    n = model.cfg.num_layers
    ctx = HookContext.build(capture=[(i, h) for i in range(n) for h in RESIDUAL_HOOKS])
    with torch.inference_mode():
        model(ids, ctx)
    cap = ctx.captured
    for layer, block in enumerate(model.blocks):
        read = cap[layer, "pre_attn"] if model.cfg.parallel_residual else cap[layer, "post_attn"]
        # post-LN: the MLP reads the (already normalised) post_attn itself
        normed = read if model.cfg.post_ln_residual else block.mlp_norm(read)
        assert torch.equal(cap[layer, "mlp_in"], normed)
        assert torch.equal(cap[layer, "mlp_out"], block.mlp_branch(cap[layer, "mlp_in"]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_as_accurate_as_transformers(family_checkpoint, dtype, device):
    """In bf16/fp16 both implementations round differently; ours must be no further
    from the float32 truth than transformers' own half-precision forward."""
    ids = ids_of(family_checkpoint, device=device)
    ours = loaded(family_checkpoint, device, dtype).model
    assert ours.dtype == dtype
    with torch.inference_mode():
        truth = load_reference(family_checkpoint).to(device)(ids).logits
        theirs = load_reference(family_checkpoint, dtype=dtype).to(device)(ids).logits.float()
        got = ours(ids).float()
    their_err = (theirs - truth).abs().max().item()
    our_err = (got - truth).abs().max().item()
    assert our_err <= 1.5 * their_err + 1e-3
    if ours.cfg.moe_layers:
        # Routing is discontinuous: where a token's top-k experts nearly tie, each
        # half-precision forward may pick its own (both stay as close to float32).
        return
    assert (got - theirs).abs().max().item() < 4e-2 * truth.abs().max().item()
