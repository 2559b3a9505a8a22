"""Alignment edges, against a brute-force pairing written here (issue 26's mutation check).

The reference pairs by the definition in docs: the longest common prefix by identity,
then the longest common suffix that does not overlap it, by the length difference.
"""

from __future__ import annotations

import random

import pytest

from patchserve.text.alignment import Alignment, align, differing_positions


def _reference(clean: list[int], corrupt: list[int]) -> list[int | None]:
    if len(clean) == len(corrupt):
        return list(range(len(corrupt)))
    limit = min(len(clean), len(corrupt))
    prefix = next((i for i in range(limit) if clean[i] != corrupt[i]), limit)
    suffix = 0
    for k in range(1, limit - prefix + 1):
        if clean[-k] != corrupt[-k]:
            break
        suffix = k
    shift = len(clean) - len(corrupt)
    return [
        d if d < prefix else d + shift if d >= len(corrupt) - suffix else None
        for d in range(len(corrupt))
    ]


def test_equal_lengths_are_one_positional_alignment():
    assert align([4, 5, 6], [4, 9, 6]) == Alignment(3, 3, prefix=3, suffix=0)


@pytest.mark.parametrize(
    ("clean", "corrupt", "prefix", "suffix"),
    [
        ([5, 1, 2], [6, 7, 1, 2], 0, 2),  # nothing in common at the start
        ([1, 2, 3, 9, 4], [1, 2, 3, 4], 3, 1),  # an odd prefix
        ([8, 1, 2, 3], [9, 9, 1, 2, 3], 0, 3),  # an odd suffix
        ([1, 2], [3, 4, 5], 0, 0),
    ],
)
def test_prefix_and_suffix_lengths_by_hand(clean, corrupt, prefix, suffix):
    a = align(clean, corrupt)
    assert (a.prefix, a.suffix) == (prefix, suffix)
    assert [a.source_position(d) for d in range(len(corrupt))] == _reference(clean, corrupt)


def test_random_pairs_match_the_brute_force_pairing():
    rng = random.Random(26)
    for _ in range(300):
        clean = [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
        corrupt = [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
        a = align(clean, corrupt)
        paired = [a.source_position(d) for d in range(len(corrupt))]
        assert paired == _reference(clean, corrupt), (clean, corrupt)
        assert a.unpaired() == [d for d, s in enumerate(paired) if s is None]
        expected = [d for d, s in enumerate(paired) if s is None or clean[s] != corrupt[d]]
        assert differing_positions(a, clean, corrupt) == expected


@pytest.mark.parametrize("dest", [-1, 3, 4])
def test_positions_outside_the_corrupt_prompt_are_refused(dest):
    for a in (align([1, 2, 3], [1, 2, 3]), align([1, 2, 3, 4], [1, 2, 3])):
        with pytest.raises(IndexError):
            a.source_position(dest)
