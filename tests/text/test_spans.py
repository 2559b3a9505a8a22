"""Span → positions resolution (shared by the server and the client)."""

from __future__ import annotations

import pytest

from models.helpers import tokenizer
from patchserve.text.spans import (
    Span,
    SpanError,
    dedup_positions,
    expand_positions,
    find_occurrence,
    incremental_char_offsets,
    parse_span,
    resolve_span,
)

PROMPT = "The capital of Germany is Berlin, and Germany is large"


def _encoding(family_checkpoint, text=PROMPT):
    tok = tokenizer(family_checkpoint)
    enc = tok.encode(text)
    return tok, enc


def test_span_resolves_to_the_overlapping_tokens(family_checkpoint):
    tok, enc = _encoding(family_checkpoint)
    positions = resolve_span(PROMPT, enc.offsets, enc.special, Span("Germany"))
    text = "".join(tok.token_strings([enc.ids[p] for p in positions]))
    assert "Germany" in text and len(text.strip()) <= len("Germany") + 2
    assert positions == sorted(positions)
    assert positions == list(range(positions[0], positions[-1] + 1))


def test_second_occurrence_is_later(family_checkpoint):
    _, enc = _encoding(family_checkpoint)
    first = resolve_span(PROMPT, enc.offsets, enc.special, Span("Germany", 0))
    second = resolve_span(PROMPT, enc.offsets, enc.special, Span("Germany", 1))
    assert min(second) > max(first)


def test_bos_is_never_selected(checkpoint_root):
    from checkpoints import build_checkpoint

    folder = build_checkpoint("llama", checkpoint_root)  # adds a BOS token
    tok = tokenizer(folder)
    enc = tok.encode(PROMPT)
    assert enc.special[0]
    positions = resolve_span(PROMPT, enc.offsets, enc.special, Span("The"))
    assert 0 not in positions and positions[0] == 1
    whole = resolve_span(PROMPT, enc.offsets, enc.special, Span(PROMPT))
    assert whole == list(range(1, len(enc.ids)))


def test_empty_missing_and_out_of_range_spans_say_which():
    with pytest.raises(SpanError, match="empty"):
        find_occurrence(PROMPT, "", 0)
    with pytest.raises(SpanError, match="'France' not found"):
        find_occurrence(PROMPT, "France", 0)
    with pytest.raises(SpanError, match=r"occurs 2 time\(s\).*occurrence 2 is out of range"):
        find_occurrence(PROMPT, "Germany", 2)
    with pytest.raises(SpanError, match="must be >= 0"):
        find_occurrence(PROMPT, "Germany", -1)


def test_mixed_ints_and_spans_expand_in_order_without_duplicates(family_checkpoint):
    _, enc = _encoding(family_checkpoint)
    germany = resolve_span(PROMPT, enc.offsets, enc.special, Span("Germany"))
    items = [1, {"span": "Germany", "occurrence": 0}, germany[0], 0, Span("Germany")]
    expanded = expand_positions(items, PROMPT, enc.offsets, enc.special)
    assert expanded == dedup_positions([1, *germany, 0])
    with pytest.raises(SpanError, match="out of range"):
        expand_positions([len(enc.ids)], PROMPT, enc.offsets, enc.special)
    with pytest.raises(SpanError, match="expected a position"):
        expand_positions([1.5], PROMPT, enc.offsets, enc.special)


def test_incremental_detokenisation_matches_offset_mapping(family_checkpoint):
    tok, enc = _encoding(family_checkpoint)
    rebuilt = incremental_char_offsets(
        lambda ids: tok.decode(ids, skip_special_tokens=True), enc.ids, enc.special
    )
    for i in range(len(enc.ids)):
        if enc.special[i]:
            assert rebuilt[i][0] == rebuilt[i][1]
            continue
        a, b = rebuilt[i]
        # Same characters as the offset mapping (up to the leading space a BPE token carries).
        assert PROMPT[a:b].strip() == PROMPT[enc.offsets[i][0] : enc.offsets[i][1]].strip()
    for text in ("Germany", "Berlin"):
        assert resolve_span(PROMPT, rebuilt, enc.special, Span(text)) == resolve_span(
            PROMPT, enc.offsets, enc.special, Span(text)
        )


def test_parse_span_rejects_bad_objects():
    assert parse_span({"span": "x"}) == Span("x", 0)
    with pytest.raises(SpanError, match="unknown span field"):
        parse_span({"span": "x", "occurence": 1})
    with pytest.raises(SpanError, match="occurrence must be an integer"):
        parse_span({"span": "x", "occurrence": "1"})
    with pytest.raises(SpanError, match="span must be a string"):
        parse_span({"span": 3})
