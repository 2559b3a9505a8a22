"""Pairing corrupt positions with clean positions."""

from __future__ import annotations

from patchserve.text.alignment import align
from patchserve.wire.sweep import AlignmentSummary


def test_equal_lengths_pair_by_position_even_where_tokens_differ():
    a = align([1, 2, 3, 4], [1, 9, 3, 4])
    assert [a.source_position(i) for i in range(4)] == [0, 1, 2, 3]
    assert a.unpaired() == []
    assert AlignmentSummary.of(a, [1, 2, 3, 4], [1, 9, 3, 4]).mode == "positional"
    assert AlignmentSummary.of(a, [1, 2, 3, 4], [1, 9, 3, 4]).differing_positions == [1]


def test_longer_clean_pairs_prefix_by_identity_and_suffix_by_shift():
    clean = [1, 2, 7, 8, 9, 5, 6]
    corrupt = [1, 2, 3, 5, 6]
    a = align(clean, corrupt)
    assert (a.prefix, a.suffix, a.shift) == (2, 2, 2)
    assert [a.source_position(i) for i in range(5)] == [0, 1, None, 5, 6]
    assert a.unpaired() == [2]


def test_shorter_clean_leaves_the_differing_middle_unpaired():
    clean = [1, 2, 5, 6]
    corrupt = [1, 2, 3, 4, 5, 6]
    a = align(clean, corrupt)
    assert [a.source_position(i) for i in range(6)] == [0, 1, None, None, 2, 3]
    summary = AlignmentSummary.of(a, clean, corrupt)
    assert summary.differing_positions == [2, 3]
    assert summary.unaligned_positions == [2, 3] and summary.mode == "prefix_suffix"
    assert (summary.prefix_len, summary.suffix_len, summary.shift) == (2, 2, -2)


def test_prefix_and_suffix_never_overlap():
    # Repeated tokens could let a greedy suffix swallow the prefix.
    clean = [1, 1, 1]
    corrupt = [1, 1]
    a = align(clean, corrupt)
    assert a.prefix + a.suffix <= len(corrupt)
    paired = [a.source_position(i) for i in range(len(corrupt))]
    assert paired == [0, 1]
