"""Span edges on hand-written offsets, with expected positions worked out by hand or by a
brute-force scan written here (issue 26's mutation check)."""

from __future__ import annotations

import pytest

from patchserve.text.spans import (
    Span,
    SpanError,
    count_occurrences,
    expand_positions,
    find_occurrence,
    incremental_char_offsets,
    parse_span,
    resolve_span,
)

#: "ab cd ab" as four tokens after a BOS: <bos> "ab" " cd" " " "ab"
PROMPT = "ab cd ab"
OFFSETS = [(0, 0), (0, 2), (2, 5), (5, 6), (6, 8)]
SPECIAL = [True, False, False, False, False]


def _brute_matches(prompt: str, text: str) -> list[int]:
    return [i for i in range(len(prompt)) if prompt[i : i + len(text)] == text]


@pytest.mark.parametrize(
    ("prompt", "text"),
    [("aaaa", "aa"), ("abab", "ab"), ("xaxa", "a"), ("abc", "abc"), ("abc", "x"), ("aaa", "a")],
)
def test_matches_are_counted_and_found_like_a_brute_force_scan(prompt, text):
    starts = _brute_matches(prompt, text)
    assert count_occurrences(prompt, text) == len(starts)
    for k, start in enumerate(starts):
        assert find_occurrence(prompt, text, k) == (start, start + len(text))
    with pytest.raises(SpanError):
        find_occurrence(prompt, text, len(starts))


def test_an_empty_span_matches_nothing():
    assert count_occurrences("abc", "") == 0


@pytest.mark.parametrize(
    ("span", "positions"),
    [
        (Span("ab"), [1]),  # the first "ab": chars 0-2, token 1 only
        (Span("ab", 1), [4]),  # the second: chars 6-8
        (Span("b c"), [1, 2]),  # crosses a token boundary
        (Span("d a"), [2, 3, 4]),
        (Span("cd"), [2]),  # inside one token
        (Span(" "), [2]),  # the first space is token 2's first character
        (Span("ab cd ab"), [1, 2, 3, 4]),  # never the BOS
    ],
)
def test_span_positions_by_hand(span, positions):
    assert resolve_span(PROMPT, OFFSETS, SPECIAL, span) == positions


def test_tokens_that_only_touch_the_span_are_not_in_it():
    # "cd" is chars 3-5: token 1 ends at 2 and token 3 starts at 5 — neither overlaps.
    offsets = [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert resolve_span("ab cd ab", offsets, [False] * 4, Span("cd")) == [2]


def test_an_empty_token_is_never_in_a_span():
    offsets = [(0, 2), (2, 2), (2, 5)]
    assert resolve_span("ab cd", offsets, [False] * 3, Span("b c")) == [0, 2]


def test_a_span_over_specials_only_is_refused():
    with pytest.raises(SpanError, match="covers no token"):
        resolve_span("ab", [(0, 2)], [True], Span("ab"))


def test_incremental_offsets_by_hand():
    words = {1: "ab", 2: " cd", 3: "!"}
    decode = lambda ids: "".join(words[i] for i in ids)
    ids, special = [0, 1, 0, 2, 3], [True, False, True, False, False]
    assert incremental_char_offsets(decode, ids, special) == [
        (0, 0),
        (0, 2),
        (2, 2),
        (2, 5),
        (5, 6),
    ]


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([0, 4], [0, 4]),
        ([-1], [4]),
        ([-5], [0]),
        ([3, -2, Span("ab", 1), 1], [3, 4, 1]),
        ([{"span": "cd"}, 2], [2]),
    ],
)
def test_ints_count_from_the_end_and_repeats_go(items, expected):
    assert expand_positions(items, PROMPT, OFFSETS, SPECIAL) == expected


@pytest.mark.parametrize("item", [5, -6, True, 1.0, "ab"])
def test_out_of_range_and_non_int_positions_are_refused(item):
    with pytest.raises(SpanError):
        expand_positions([item], PROMPT, OFFSETS, SPECIAL)


def test_parse_span_reads_the_occurrence_and_refuses_a_bool():
    assert parse_span({"span": "ab", "occurrence": 1}) == Span("ab", 1)
    assert parse_span(Span("x", 2)) == Span("x", 2)
    assert Span("x", 2).to_json() == {"span": "x", "occurrence": 2}
    with pytest.raises(SpanError, match="occurrence must be an integer"):
        parse_span({"span": "ab", "occurrence": True})
    with pytest.raises(SpanError, match="expected a position"):
        parse_span({"text": "ab"})


def test_offsets_and_special_flags_of_different_lengths_are_an_error():
    with pytest.raises(ValueError, match="zip"):
        incremental_char_offsets(lambda ids: "x" * len(ids), [1, 2, 3], [False, False])
    with pytest.raises(ValueError, match="zip"):  # not a SpanError: the inputs disagree
        resolve_span(PROMPT, OFFSETS, SPECIAL[:-1], Span("ab", 0))
