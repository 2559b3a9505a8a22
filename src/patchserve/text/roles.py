"""ROME's token roles: where a token sits relative to the subject of a factual prompt.

Meng et al. (2022) average causal traces over many facts by aligning each
prompt's tokens on six roles (their ``read_knowledge``): the first subject
token, the middle subject tokens, the last subject token, the first token
after the subject, the further tokens, and the last token. Tokens before the
subject belong to no role. With a one-token subject that token is both first
and last; with the subject right before the last token, that last token is
also the first subsequent one — as in ROME. Torch-free (server and client).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ROLES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)

_WORD = re.compile(r"\w")


def token_roles(subject: Sequence[int], length: int) -> dict[str, list[int]]:
    """The positions of each role for a subject at ``subject`` (token positions) in a
    prompt of ``length`` tokens; the subject is taken as its first..last range."""
    if not subject:
        raise ValueError("the subject covers no token")
    first, last = min(subject), max(subject)
    if not 0 <= first <= last < length:
        raise ValueError(f"subject positions {list(subject)} are outside 0..{length - 1}")
    after, end = last + 1, length - 1
    return {
        "first subject token": [first],
        "middle subject tokens": list(range(first + 1, last)),
        "last subject token": [last],
        "first subsequent token": [after] if after <= end else [],
        "further tokens": list(range(after + 1, end)),
        "last token": [end],
    }


def differing_words(clean: str, corrupt: str) -> str:
    """The words of ``clean`` where it differs from ``corrupt`` (a fact pair's subject):
    the characters between the common prefix and suffix, widened to whole words."""
    prefix = 0
    while prefix < min(len(clean), len(corrupt)) and clean[prefix] == corrupt[prefix]:
        prefix += 1
    suffix = 0
    limit = min(len(clean), len(corrupt)) - prefix
    while suffix < limit and clean[-1 - suffix] == corrupt[-1 - suffix]:
        suffix += 1
    start, end = prefix, len(clean) - suffix
    if start >= end:
        raise ValueError("the prompts do not differ")
    while start > 0 and _WORD.match(clean[start - 1]):
        start -= 1
    while end < len(clean) and _WORD.match(clean[end]):
        end += 1
    return clean[start:end]
