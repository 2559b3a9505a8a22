"""Resolving a study's answer and foil tokens (the axes are parsed in ``wire.axes``)."""

from __future__ import annotations

from patchserve.engine.errors import InvalidArgument
from patchserve.text.tokenizer import Tokenizer
from patchserve.wire.axes import not_one_token


def resolve_token(
    tokenizer: Tokenizer,
    vocab_size: int,
    text: str | None,
    token_id: int | None,
    param: str,
) -> int | None:
    """A token id from ``*_token_id`` (wins) or a string that must be exactly one token."""
    if token_id is not None:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise InvalidArgument(f"{param}_id must be an integer", f"{param}_id")
        if not 0 <= token_id < vocab_size:
            raise InvalidArgument(
                f"{param}_id {token_id} is outside the vocabulary (0-{vocab_size - 1})",
                f"{param}_id",
            )
        return token_id
    if text is None:
        return None
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"{param} must be a non-empty string", param)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        spaced = None if text.startswith(" ") else tokenizer.encode(" " + text, False).ids
        raise InvalidArgument(not_one_token(param, text, ids, spaced), param)
    return ids[0]
