"""OpenAI-shaped answers of ``/v1/completions`` and ``/v1/chat/completions``.

With ``logprob_token_ids`` and ``logprobs`` both given, each step's
``top_logprobs`` lists the requested ids in place of the top-k (as the seed
server does), plus the chosen token; ``logprob_token_ids`` on the choice
repeats them keyed by id (a patchserve addition, exact even where two ids
decode to the same string).
"""

from __future__ import annotations

from typing import Literal

from patchserve.wire.base import WireModel, omitted_if_none


class CompletionLogprobs(WireModel):
    """The legacy completions ``logprobs`` object; ``text_offset`` indexes the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(WireModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]
    token_ids: list[int]
    logprob_token_ids: list[dict[str, float]] | None = omitted_if_none()
    captured_source_run: str | None = omitted_if_none()


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(WireModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatTopLogprob(WireModel):
    token: str
    logprob: float


class ChatTokenLogprob(WireModel):
    token: str
    logprob: float
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(WireModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(WireModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(WireModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    token_ids: list[int]
    logprob_token_ids: list[dict[str, float]] | None = omitted_if_none()
    captured_source_run: str | None = omitted_if_none()


class ChatCompletionResponse(WireModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# -- streaming (``stream: true``): OpenAI's chunks, one ``data: {...}`` event each ----------


class CompletionChunkChoice(WireModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionChunk(WireModel):
    """One event of a streamed completion: new text of some choices (``choices`` is empty in
    the last event with ``stream_options.include_usage``, which carries ``usage``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = omitted_if_none()


class ChatDelta(WireModel):
    role: Literal["assistant"] | None = omitted_if_none()
    content: str | None = omitted_if_none()


class ChatChunkChoice(WireModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(WireModel):
    """One event of a streamed chat completion (``usage``: as :class:`CompletionChunk`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = omitted_if_none()
