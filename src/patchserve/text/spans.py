"""Substring spans → token positions, shared by the server and the client.

A span ``{"span": "Germany", "occurrence": 0}`` names the tokens whose
character ranges overlap the ``occurrence``-th match of the substring in the
prompt. Character ranges come from the fast tokenizer's offset mapping (which
indexes the original prompt); without one they are rebuilt by incremental
detokenisation. Special tokens (BOS, ...) have no characters and never match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

Offsets = Sequence[tuple[int, int]]


class SpanError(ValueError):
    """A span that cannot be resolved; the message says which and why."""


@dataclass(frozen=True)
class Span:
    """A substring marker that may stand in a positions list."""

    text: str
    occurrence: int = 0

    def to_json(self) -> dict[str, object]:
        return {"span": self.text, "occurrence": self.occurrence}


def incremental_char_offsets(
    decode: Callable[[list[int]], str], ids: Sequence[int], special: Sequence[bool]
) -> list[tuple[int, int]]:
    """Character range of each token from decoding growing prefixes (specials: empty)."""
    offsets: list[tuple[int, int]] = []
    kept: list[int] = []
    end = 0
    for token, is_special in zip(ids, special, strict=True):
        if is_special:
            offsets.append((end, end))
            continue
        kept.append(token)
        new_end = len(decode(kept))
        offsets.append((end, new_end))
        end = new_end
    return offsets


def count_occurrences(prompt: str, text: str) -> int:
    """How many (possibly overlapping) matches of ``text`` the prompt holds."""
    if not text:
        return 0
    count, start = 0, prompt.find(text)
    while start >= 0:
        count += 1
        start = prompt.find(text, start + 1)
    return count


def find_occurrence(prompt: str, text: str, occurrence: int) -> tuple[int, int]:
    """Character range of the ``occurrence``-th (0-based) match of ``text`` in ``prompt``."""
    if not text:
        raise SpanError("span text is empty")
    if occurrence < 0:
        raise SpanError(f"span occurrence must be >= 0, got {occurrence}")
    start, found = -1, 0
    while True:
        start = prompt.find(text, start + 1)
        if start < 0:
            break
        if found == occurrence:
            return start, start + len(text)
        found += 1
    if found == 0:
        raise SpanError(f"span {text!r} not found in the prompt")
    raise SpanError(
        f"span {text!r} occurs {found} time(s) in the prompt; "
        f"occurrence {occurrence} is out of range"
    )


def resolve_span(prompt: str, offsets: Offsets, special: Sequence[bool], span: Span) -> list[int]:
    """Token positions whose characters overlap the span's match, in order."""
    start, end = find_occurrence(prompt, span.text, span.occurrence)
    positions = [
        i
        for i, ((a, b), is_special) in enumerate(zip(offsets, special, strict=True))
        if not is_special and b > a and a < end and b > start
    ]
    if not positions:
        raise SpanError(f"span {span.text!r} covers no token of the prompt")
    return positions


def dedup_positions(positions: Iterable[int]) -> list[int]:
    """Order-preserving de-duplication."""
    return list(dict.fromkeys(positions))


def parse_span(item: object) -> Span:
    """A :class:`Span` from a ``Span`` or its JSON form ``{"span": str, "occurrence": int}``."""
    if isinstance(item, Span):
        return item
    if isinstance(item, dict) and "span" in item:
        text, occurrence = item["span"], item.get("occurrence", 0)
        if not isinstance(text, str):
            raise SpanError("span must be a string")
        if not isinstance(occurrence, int) or isinstance(occurrence, bool):
            raise SpanError("span occurrence must be an integer")
        extra = set(item) - {"span", "occurrence"}
        if extra:
            raise SpanError(f"unknown span field(s): {', '.join(sorted(extra))}")
        return Span(text, occurrence)
    raise SpanError(f"expected a position (int) or a span object, got {item!r}")


def expand_positions(
    items: Iterable[object],
    prompt: str,
    offsets: Offsets,
    special: Sequence[bool],
) -> list[int]:
    """Ints and spans, expanded in order, duplicates removed; ints range-checked.

    A negative int counts from the end, as in Python and TransformerLens (``-1``
    is the last token).
    """
    n = len(offsets)
    out: list[int] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            if not -n <= item < n:
                raise SpanError(
                    f"position {item} is out of range for a prompt of {n} tokens "
                    f"(0 to {n - 1}, or -{n} to -1 from the end)"
                )
            out.append(item % n)
        else:
            out.extend(resolve_span(prompt, offsets, special, parse_span(item)))
    return dedup_positions(out)
