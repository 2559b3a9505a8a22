"""Warnings a study deserves: results that are valid but probably not what was meant.

Each check returns sentences a researcher can act on; they travel in the
sweep body's ``warnings`` (and the stream's summary), the client raises them
as Python warnings and the command line prints them. None of them stops the
study: the grid is exact, it is the question that may be wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from patchserve.text.spans import count_occurrences, parse_span
from patchserve.text.tokenizer import Tokenizer

#: Below this clean probability an answer is suspicious (if a spelling variant is likely).
IMPROBABLE = 1e-3
#: How far down the clean ranking a likely variant is looked for.
VARIANT_TOP_K = 5


def span_warnings(prompt: str, positions: Any) -> list[str]:
    """A span whose text occurs more than once: the chosen occurrence may not be the one meant."""
    if not isinstance(positions, Sequence) or isinstance(positions, str):
        return []
    out = []
    for item in positions:
        if isinstance(item, int):
            continue
        span = parse_span(item)
        found = count_occurrences(prompt, span.text)
        if found > 1:
            out.append(
                f"span {span.text!r} occurs {found} times in the prompt; occurrence "
                f"{span.occurrence} was used (pass occurrence to pick another)"
            )
    return out


def identical_prompts_warning(clean_ids: Sequence[int], corrupt_ids: Sequence[int]) -> list[str]:
    if list(clean_ids) != list(corrupt_ids):
        return []
    return [
        "the clean and corrupt prompts are identical token for token: every cell equals the "
        "corrupt baseline, so the grid carries no information"
    ]


def _variants(tokenizer: Tokenizer, answer: int) -> list[int]:
    """Single-token spellings of the answer with the leading space added or removed."""
    text = tokenizer.decode([answer])
    spellings = {text.lstrip(), " " + text.lstrip()} - {text, ""}
    out = []
    for spelling in sorted(spellings):
        ids = tokenizer.encode(spelling, add_special_tokens=False).ids
        if len(ids) == 1 and ids[0] != answer:
            out.append(ids[0])
    return out


def improbable_answer_warning(
    tokenizer: Tokenizer, clean_logits: torch.Tensor, answer: int, param: str = "answer_token"
) -> list[str]:
    """The answer is improbable on the clean run while a spelling variant is likely there:
    most often a missing (or extra) leading space."""
    logprobs = torch.log_softmax(clean_logits.double(), -1)
    p_answer = float(logprobs[answer].exp())
    if p_answer >= IMPROBABLE:
        return []
    top = logprobs.topk(min(VARIANT_TOP_K, logprobs.shape[-1])).indices.tolist()
    for variant in _variants(tokenizer, answer):
        if variant in top:
            p_variant = float(logprobs[variant].exp())
            return [
                f"{param} {tokenizer.decode([answer])!r} (id {answer}) has clean probability "
                f"{p_answer:.2g}, but {tokenizer.decode([variant])!r} (id {variant}) is "
                f"#{top.index(variant) + 1} on the clean run at {p_variant:.4g}: did you mean "
                "it? (check the leading space)"
            ]
    return []
