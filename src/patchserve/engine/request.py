"""Resolving a study's answer and foil tokens (the axes are parsed in ``wire.axes``)."""

from __future__ import annotations

from patchserve.engine.errors import InvalidArgument
from patchserve.text.tokenizer import Tokenizer
from patchserve.wire.axes import not_one_token


def _check_id(token_id: object, vocab_size: int, param: str) -> int:
    if isinstance(token_id, bool) or not isinstance(token_id, int):
        raise InvalidArgument(f"{param}_id must be an integer", f"{param}_id")
    if not 0 <= token_id < vocab_size:
        raise InvalidArgument(
            f"{param}_id {token_id} is outside the vocabulary (0-{vocab_size - 1})",
            f"{param}_id",
        )
    return token_id


def _encode(tokenizer: Tokenizer, text: object, param: str) -> list[int]:
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"{param} must be a non-empty string", param)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise InvalidArgument(f"{param} {text!r} tokenizes to no tokens", param)
    return list(ids)


def resolve_token(
    tokenizer: Tokenizer,
    vocab_size: int,
    text: str | None,
    token_id: int | None,
    param: str,
) -> int | None:
    """A token id from ``*_token_id`` (wins) or a string that must be exactly one token."""
    if token_id is not None:
        return _check_id(token_id, vocab_size, param)
    if text is None:
        return None
    ids = _encode(tokenizer, text, param)
    if len(ids) != 1:
        spaced = None if text.startswith(" ") else tokenizer.encode(" " + text, False).ids
        raise InvalidArgument(not_one_token(param, text, ids, spaced), param)
    return ids[0]


def resolve_tokens(
    tokenizer: Tokenizer,
    vocab_size: int,
    text: str | None,
    token_ids: int | list[int] | None,
    param: str,
    warnings: list[str],
) -> list[int] | None:
    """A graded continuation: ``*_token_id`` (an id or a list of ids; wins) or a string of
    one or more tokens. A string of several tokens gets a warning naming them (it is graded
    as a continuation, which may not be what was meant), saying so when it is one token
    with a leading space (it is probably meant as the next word)."""
    if token_ids is not None:
        listed = token_ids if isinstance(token_ids, list) else [token_ids]
        if not listed:
            raise InvalidArgument(f"{param}_id is an empty list", f"{param}_id")
        return [_check_id(i, vocab_size, param) for i in listed]
    if text is None:
        return None
    ids = _encode(tokenizer, text, param)
    if len(ids) > 1:
        warnings.append(_continuation_warning(tokenizer, text, ids, param))
    return ids


def _continuation_warning(tokenizer: Tokenizer, text: str, ids: list[int], param: str) -> str:
    """A string answer of several tokens: their ids and strings (a character the vocabulary
    lacks becomes byte tokens that each read as "\ufffd"), and the one-token spelling with a
    leading space when there is one."""
    pieces = ", ".join(repr(piece) for piece in tokenizer.token_strings(ids))
    message = (
        f"{param} {text!r} is {len(ids)} tokens {ids} ({pieces}): graded as a continuation, "
        "their teacher-forced total log-probability"
    )
    if not text.startswith(" "):
        spaced = tokenizer.encode(" " + text, False).ids
        if len(spaced) == 1:
            message += f"; {' ' + text!r} is one token (id {spaced[0]}) — did you mean it?"
    return message
