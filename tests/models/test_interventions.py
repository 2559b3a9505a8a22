"""Patching, steering and the forward entry points the sweep engine relies on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.helpers import OTHER, PROMPT, ids_of, loaded, tokenizer
from patchserve.models import HookContext, ResumeRows, Reuse, make_edit
from patchserve.models.hooks import HOOKS, RESIDUAL_HOOKS, blend


def _all_sites(n: int) -> list[tuple[int, str]]:
    return [(i, h) for i in range(n) for h in HOOKS]


@dataclass
class _Out:
    logits: torch.Tensor  # [batch, tokens, vocab]
    captured: dict


def _run(model, ids, edits=(), capture=()):
    ctx = HookContext.build(edits, capture)
    with torch.inference_mode():
        return _Out(model(ids, ctx), ctx.captured)


def _positions(starts, width):
    return torch.tensor(starts)[:, None] + torch.arange(width)[None]


def test_alpha_zero_is_a_bitwise_noop(family_checkpoint):
    model = loaded(family_checkpoint).model
    ids = ids_of(family_checkpoint)
    t = ids.shape[1]
    base = _run(model, ids).logits
    gen = torch.Generator().manual_seed(0)
    for hook in HOOKS:
        width = model.cfg.hook_width(hook)
        source = torch.randn(t, width, generator=gen) * 100
        heads = [1] * t if hook == "attn_head" else None
        edit = make_edit(1, hook, [0] * t, range(t), source, alpha=0.0, heads=heads)
        assert torch.equal(_run(model, ids, [edit]).logits, base), hook


def test_patching_a_run_with_its_own_activations_is_bitwise_identical(family_checkpoint):
    model = loaded(family_checkpoint).model
    n = model.cfg.num_layers
    ids = ids_of(family_checkpoint)
    t = ids.shape[1]
    base = _run(model, ids, capture=_all_sites(n))
    for layer in range(n):
        for hook in HOOKS:
            own = base.captured[layer, hook][0]
            if hook == "attn_head":
                edit = make_edit(layer, hook, [0] * t, range(t), own[:, 2], heads=[2] * t)
            else:
                edit = make_edit(layer, hook, [0] * t, range(t), own)
            assert torch.equal(_run(model, ids, [edit]).logits, base.logits)


def test_replacing_layer0_residual_reproduces_the_clean_run(family_checkpoint):
    model = loaded(family_checkpoint).model
    clean, corrupt = ids_of(family_checkpoint, PROMPT), ids_of(family_checkpoint, OTHER)
    assert clean.shape == corrupt.shape and not torch.equal(clean, corrupt)
    t = clean.shape[1]
    clean_run = _run(model, clean, capture=[(0, "pre_attn")])
    edit = make_edit(0, "pre_attn", [0] * t, range(t), clean_run.captured[0, "pre_attn"][0])
    patched = _run(model, corrupt, [edit]).logits
    assert torch.equal(patched, clean_run.logits)


def test_patch_follows_the_interpolation_formula_with_masks(family_checkpoint):
    model = loaded(family_checkpoint).model
    ids = ids_of(family_checkpoint)
    d = model.cfg.hidden_size
    base = _run(model, ids, capture=[(1, "mlp_out")]).captured[1, "mlp_out"]
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(2, d, generator=gen)
    mask = (torch.rand(2, d, generator=gen) > 0.5).float()
    mask[1] = torch.rand(d, generator=gen)  # a soft mask
    alpha = torch.tensor([0.25, 0.8])
    edit = make_edit(1, "mlp_out", [0, 0], [3, 5], source, alpha=alpha, mask=mask)
    got = _run(model, ids, [edit], capture=[(1, "mlp_out")]).captured[1, "mlp_out"]
    for i, pos in enumerate((3, 5)):
        w = alpha[i] * mask[i]
        expected = (1 - w) * base[0, pos] + w * source[i]
        assert torch.allclose(got[0, pos], expected, atol=1e-6)
    untouched = [p for p in range(ids.shape[1]) if p not in (3, 5)]
    assert torch.equal(got[0, untouched], base[0, untouched])


def test_blend_is_exact_at_the_ends():
    h = torch.tensor([-0.0, 1.5, float("1e30"), -2.0])
    s = torch.tensor([3.0, -7.25, 1.0, float("-1e-30")])
    assert torch.equal(blend(h, s, torch.ones(4)), s)
    assert torch.equal(blend(h, s, torch.zeros(4)), h)
    assert torch.equal(torch.signbit(blend(h, s, torch.zeros(4))), torch.signbit(h))


def test_head_patch_touches_only_that_head(family_checkpoint):
    model = loaded(family_checkpoint).model
    cfg = model.cfg
    ids = ids_of(family_checkpoint)
    source = torch.full((cfg.head_dim,), 0.5)
    edit = make_edit(0, "attn_head", [0], [4], source, heads=[cfg.num_heads - 1])
    site = [(0, "attn_head")]
    base = _run(model, ids, capture=site).captured[0, "attn_head"]
    got = _run(model, ids, [edit], capture=site).captured[0, "attn_head"]
    assert torch.equal(got[0, 4, -1], source)
    changed = (got != base).any(dim=-1)
    assert changed.sum().item() == 1 and changed[0, 4, -1]


def test_steering_adds_a_scaled_vector(family_checkpoint):
    model = loaded(family_checkpoint).model
    ids = ids_of(family_checkpoint)
    vec = torch.linspace(-1, 1, model.cfg.hidden_size)
    site = [(1, "post_block")]
    base = _run(model, ids, capture=site).captured[1, "post_block"]
    edit = make_edit(1, "post_block", [0, 0], [2, 6], vec, alpha=3.0, kind="add")
    got = _run(model, ids, [edit], capture=site).captured[1, "post_block"]
    assert torch.allclose(got[0, 2], base[0, 2] + 3.0 * vec, atol=1e-6)
    assert torch.allclose(got[0, 6], base[0, 6] + 3.0 * vec, atol=1e-6)
    assert torch.equal(got[0, 3], base[0, 3])


def test_edits_address_rows_independently(family_checkpoint):
    model = loaded(family_checkpoint).model
    clean, corrupt = ids_of(family_checkpoint, PROMPT), ids_of(family_checkpoint, OTHER)
    t = clean.shape[1]
    clean_run = _run(model, clean, capture=[(1, "post_attn")])
    source = clean_run.captured[1, "post_attn"][0]
    batch = corrupt.expand(3, -1)
    edits = [make_edit(1, "post_attn", [r] * t, range(t), source) for r in (0, 2)]
    out = _run(model, batch, edits).logits
    alone = _run(model, corrupt).logits
    patched_alone = _run(model, corrupt, [make_edit(1, "post_attn", [0] * t, range(t), source)])
    assert (out[1] - alone[0]).abs().max() < 1e-5
    assert (out[0, -1] - patched_alone.logits[0, -1]).abs().max() < 1e-5
    assert (out[2] - out[0]).abs().max() < 1e-5


def test_start_at_layer_from_the_stored_residual(family_checkpoint):
    model = loaded(family_checkpoint).model
    n = model.cfg.num_layers
    ids = ids_of(family_checkpoint)
    full = _run(model, ids, capture=[(i, "pre_attn") for i in range(n)])
    for layer in range(1, n):
        hidden = full.captured[layer, "pre_attn"]
        with torch.inference_mode():
            got = model.unembed(model.run_blocks(ResumeRows.build(hidden), layer))
        assert torch.equal(got, full.logits)


def test_suffix_rows_share_one_prefix_cache(family_checkpoint):
    """Rows with different prefix lengths on one batch-1 cache equal their own full forwards."""
    model = loaded(family_checkpoint).model
    ids = ids_of(family_checkpoint)
    t = ids.shape[1]
    with torch.inference_mode():
        full = model.prefill(ids)
        full_logits = model.unembed(full.hidden)
        starts = [3, 5, 9]
        width = t - min(starts)
        rows = torch.zeros(len(starts), width, dtype=torch.long)
        lengths = torch.tensor([t - s for s in starts])
        for r, s in enumerate(starts):
            rows[r, : t - s] = ids[0, s:]
        hidden = model.embed(rows, _positions(starts, width))
        resumed = ResumeRows.build(hidden, torch.tensor(starts), lengths)
        out = model.unembed(model.run_blocks(resumed, 0, full.cache))
    for r, s in enumerate(starts):
        assert (out[r, : t - s] - full_logits[0, s:]).abs().max() < 1e-5


def test_suffix_from_a_layer_on_a_shared_prefix(family_checkpoint):
    """The sweep engine's path: start at layer l, positions >= p, on the corrupt cache."""
    model = loaded(family_checkpoint).model
    n = model.cfg.num_layers
    ids = ids_of(family_checkpoint)
    t = ids.shape[1]
    with torch.inference_mode():
        full = model.prefill(ids, HookContext.build(capture=[(i, "pre_attn") for i in range(n)]))
        for layer in range(1, n):
            for p in (0, 4, t - 1):
                hidden = full.captured[layer, "pre_attn"][:, p:]
                got = model.resume(ResumeRows.build(hidden, p), layer, full.cache)
                assert (got[0] - full.logits[0]).abs().max() < 1e-5


def test_right_padded_batch_matches_rows_alone(family_checkpoint):
    model = loaded(family_checkpoint).model
    tok = tokenizer(family_checkpoint)
    texts = [PROMPT, "The capital of France", "John"]
    encoded = [tok.encode(t).ids for t in texts]
    t = max(map(len, encoded))
    batch = torch.full((len(texts), t), 2, dtype=torch.long)
    for r, e in enumerate(encoded):
        batch[r, : len(e)] = torch.tensor(e)
    lengths = torch.tensor([len(e) for e in encoded])
    with torch.inference_mode():
        out = model(batch, lengths=lengths)
        for r, e in enumerate(encoded):
            alone = model.prefill(torch.tensor([e])).logits
            assert (out[r, len(e) - 1] - alone[0]).abs().max() < 1e-5


def test_decoding_steps_on_an_extended_cache(family_checkpoint):
    model = loaded(family_checkpoint).model
    ids = ids_of(family_checkpoint)
    with torch.inference_mode():
        full = model(ids)
        step = model.prefill(ids[:, :5])
        cache = step.cache
        for i in range(5, ids.shape[1]):
            step = model.extend(ids[:, i : i + 1], cache)
            cache = cache.extend(step.cache)
            assert (step.logits[0] - full[0, i]).abs().max() < 1e-5
    assert cache.length == ids.shape[1]


def test_edits_at_positions_past_the_window_wait(family_checkpoint):
    """An edit at a later absolute position applies only on the pass that computes it."""
    model = loaded(family_checkpoint).model
    ids = ids_of(family_checkpoint)
    t = ids.shape[1]
    vec = torch.ones(model.cfg.hidden_size)
    edit = make_edit(0, "post_block", [0], [t - 1], vec, alpha=2.0, kind="add")
    with torch.inference_mode():
        whole = model.prefill(ids, HookContext.build([edit])).logits
        head = model.prefill(ids[:, :-1], HookContext.build([edit]))
        tail = model.extend(ids[:, -1:], head.cache, HookContext.build([edit])).logits
        plain = model.prefill(ids[:, :-1]).logits
    assert torch.equal(head.logits, plain)
    assert (tail - whole).abs().max() < 1e-5


def test_residual_hooks_are_listed_in_block_order():
    assert RESIDUAL_HOOKS == (
        "pre_attn",
        "attn_out",
        "post_attn",
        "mlp_in",
        "mlp_out",
        "post_block",
    )


def test_packed_rows_equal_padded_rows(family_checkpoint):
    """Rows packed back to back (no padding) on a shared prefix, with edits, match padded rows."""
    model = loaded(family_checkpoint).model
    ids = ids_of(family_checkpoint)
    t = ids.shape[1]
    starts = [2, 6, 11]
    lengths = torch.tensor([t - s for s in starts])
    vec = torch.linspace(-2, 2, model.cfg.hidden_size)
    edits = [make_edit(1, "post_attn", [0, 1, 2], starts, vec)]
    with torch.inference_mode():
        full = model.prefill(ids)
        width = t - min(starts)
        padded = torch.full((3, width), 2, dtype=torch.long)
        for r, s in enumerate(starts):
            padded[r, : t - s] = ids[0, s:]
        packed = torch.cat([ids[0, s:] for s in starts])
        packed_positions = torch.cat([torch.arange(s, t) for s in starts])
        offsets = torch.tensor(starts)
        padded_rows = ResumeRows.build(
            model.embed(padded, _positions(starts, width)), offsets, lengths
        )
        packed_rows = ResumeRows.build(model.embed(packed, packed_positions), offsets, lengths)
        a = model.resume(padded_rows, 0, full.cache, hooks=HookContext.build(edits))
        b = model.resume(packed_rows, 0, full.cache, hooks=HookContext.build(edits))
    assert (a - b).abs().max() < 1e-5


def test_resume_with_reused_attention_equals_full_forward(family_checkpoint):
    model = loaded(family_checkpoint).model
    n = model.cfg.num_layers
    ids = ids_of(family_checkpoint)
    sites = [(i, h) for i in range(n) for h in ("pre_attn", "attn_out", "attn_head")]
    with torch.inference_mode():
        full = model.prefill(ids, HookContext.build(capture=sites))
        for layer in range(n):
            x = full.captured[layer, "pre_attn"]
            for reuse in (
                Reuse(attn_out=full.captured[layer, "attn_out"]),
                Reuse(attn_head=full.captured[layer, "attn_head"]),
            ):
                got = model.resume(ResumeRows.build(x), layer, reuse=reuse)
                assert (got - full.logits).abs().max() < 1e-5


def test_narrowed_final_block_matches_the_full_one(family_checkpoint):
    """Only the last tokens through the final block: same logits, edits there still apply."""
    model = loaded(family_checkpoint).model
    ids = ids_of(family_checkpoint).expand(2, -1)
    n, t = model.cfg.num_layers, ids.shape[1]
    vec = torch.linspace(-1, 1, model.cfg.hidden_size)
    edits = [
        make_edit(n - 1, "mlp_in", [1], [t - 1], vec),  # applies: last token
        make_edit(n - 1, "post_attn", [0], [3], vec),  # cannot reach the last token
        make_edit(n - 1, "pre_attn", [0], [5], vec),  # changes keys of the last block
    ]
    lengths = torch.tensor([t, t - 4])
    with torch.inference_mode():
        full = model(ids, HookContext.build(edits), lengths=lengths)[[0, 1], lengths - 1]
        hidden = model.embed(ids, _positions([0, 0], t))
        rows = ResumeRows.build(hidden, 0, lengths)
        narrow = model.resume(rows, 0, hooks=HookContext.build(edits))
    assert narrow.shape == (2, model.cfg.vocab_size)
    assert (narrow - full).abs().max() < 1e-5
