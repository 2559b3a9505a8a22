"""Incremental detokenisation, stop strings and chat templates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from patchserve.engine.errors import InvalidArgument
from patchserve.text.tokenizer import Tokenizer

DETOKENIZE_CONTEXT = 6  # tokens of left context when detokenizing incrementally


class Detokenizer:
    """Incremental detokenization with a few tokens of left context (as TGI/vLLM do).

    A token's text is released once it decodes to complete characters (byte
    level BPE may split a character over several tokens); ``push`` returns the
    character offset at which the token's text starts in ``text``.
    """

    def __init__(self, tokenizer: Tokenizer, ids: list[int], start: int) -> None:
        self.tokenizer = tokenizer
        self.ids = list(ids[:start])
        self.prefix = max(0, start - DETOKENIZE_CONTEXT)
        self.read = start
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _release(self, force: bool) -> None:
        prefix_text = self._decode(self.ids[self.prefix : self.read])
        new_text = self._decode(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and (force or not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, token: int) -> int:
        offset = len(self.text)
        self.ids.append(token)
        self._release(force=False)
        return offset

    def flush(self) -> None:
        if self.read < len(self.ids):
            self._release(force=True)


def find_stop(text: str, stops: Sequence[str], start: int, floor: int) -> int | None:
    """Index (``>= floor``) of the earliest stop string in ``text`` that ends after ``start``."""
    best = None
    for s in stops:
        i = text.find(s, max(floor, start - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt ids of chat ``messages`` through the tokenizer's template, ready for the reply."""
    if not tokenizer.has_chat_template:
        raise InvalidArgument("this model's tokenizer has no chat template", "messages")
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidArgument("messages must be a non-empty list of message objects", "messages")
    for m in messages:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidArgument(
                f"each message must be an object with a string 'role', got {m!r}", "messages"
            )
    try:
        out: Any = tokenizer.hf.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True
        )
    except Exception as exc:  # the template runs user content through jinja
        raise InvalidArgument(
            f"the chat template failed on these messages: {exc}", "messages"
        ) from exc
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(i) for i in out]
