"""Property-based tests (hypothesis) of the pure pieces: invariants over many random inputs."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from patchserve.models.hooks import blend
from patchserve.text.alignment import align, differing_positions
from patchserve.text.spans import SpanError, expand_positions
from patchserve.wire.packing import pack_vectors, unpack_vectors

token_ids = st.lists(st.integers(0, 5), min_size=1, max_size=12)


@given(clean=token_ids, corrupt=token_ids)
def test_alignment_pairs_only_identical_context_and_never_shifts_silently(clean, corrupt):
    a = align(clean, corrupt)
    assert a.prefix + a.suffix <= len(corrupt) or len(clean) == len(corrupt)
    paired = [a.source_position(i) for i in range(len(corrupt))]
    if len(clean) == len(corrupt):
        assert paired == list(range(len(corrupt)))
        return
    for dest, src in enumerate(paired):
        if src is None:
            continue
        assert 0 <= src < len(clean) and clean[src] == corrupt[dest]  # same token, same context
        assert src in (dest, dest + len(clean) - len(corrupt))  # prefix or suffix, nothing else
    unpaired = [i for i, src in enumerate(paired) if src is None]
    assert unpaired == a.unpaired() and set(unpaired) <= set(differing_positions(a, clean, corrupt))
    sources = [s for s in paired if s is not None]
    assert sources == sorted(sources) and len(set(sources)) == len(sources)  # order-preserving


finite32 = st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32)


@given(
    values=arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 9)), elements=finite32)
)
def test_packing_round_trips(values):
    np.testing.assert_array_equal(unpack_vectors(pack_vectors(values, "float32")), values)
    with np.errstate(over="ignore"):  # values past float16's range become inf: skipped below
        half = values.astype(np.float16)
    if np.isfinite(half).all():
        np.testing.assert_array_equal(unpack_vectors(pack_vectors(half, "float16")), half)
    bf16 = torch.from_numpy(values).to(torch.bfloat16)
    if torch.isfinite(bf16).all():  # numpy's round-to-nearest-even equals torch's cast
        unpacked = unpack_vectors(pack_vectors(values, "bfloat16"))
        np.testing.assert_array_equal(unpacked, bf16.float().numpy())


@given(
    n=st.integers(1, 12),
    items=st.lists(st.integers(-15, 15), min_size=1, max_size=8),
)
def test_position_expansion_is_ordered_deduplicated_and_counts_from_the_end(n, items):
    offsets = [(i, i + 1) for i in range(n)]
    prompt = "x" * n
    try:
        out = expand_positions(items, prompt, offsets, [False] * n)
    except SpanError:
        assert any(not -n <= i < n for i in items)
        return
    expected = list(dict.fromkeys(i % n for i in items))
    assert out == expected


@given(
    h=arrays(np.float32, 8, elements=finite32),
    s=arrays(np.float32, 8, elements=finite32),
    w=arrays(np.float32, 8, elements=st.sampled_from([0.0, 1.0, 0.5, 0.25])),
)
def test_blend_copies_exactly_at_one_and_changes_nothing_at_zero(h, s, w):
    out = blend(torch.from_numpy(h), torch.from_numpy(s), torch.from_numpy(w)).numpy()
    np.testing.assert_array_equal(out[w == 1], s[w == 1])
    np.testing.assert_array_equal(out[w == 0], h[w == 0])
    for dtype in (torch.bfloat16, torch.float16):
        hd, sd = torch.from_numpy(h).to(dtype), torch.from_numpy(s).to(dtype)
        got = blend(hd, sd, torch.from_numpy(w))
        assert got.dtype == dtype
        assert torch.equal(got[torch.from_numpy(w == 1)], sd[torch.from_numpy(w == 1)])


@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(2, 40),
    budget=st.integers(1, 200),
    starts=st.lists(st.integers(0, 39), min_size=1, max_size=30),
)
def test_batch_planner_keeps_every_row_once_and_respects_the_budget(length, budget, starts):
    from patchserve.engine.sweep_plan import AttentionShape, pack

    starts = [p % length for p in starts]
    batches = pack(starts, [length], budget, AttentionShape(4, 16, softcapped=False))
    assert sorted(i for b in batches for i in b) == list(range(len(starts)))
    limit = max(budget, length)
    for batch in batches:
        tokens = sum(length - starts[i] for i in batch)
        assert tokens <= limit or len(batch) == 1
