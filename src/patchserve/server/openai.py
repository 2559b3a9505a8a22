"""OpenAI's shapes of what a generation reports: the legacy completions ``logprobs`` object
and the chat ``logprobs.content`` list (the engine reports tokens and their distributions;
their OpenAI spelling is the server's business)."""

from __future__ import annotations

from patchserve.engine.generation import ReportedTokens, TokenStep
from patchserve.text.tokenizer import Tokenizer
from patchserve.wire.completions import (
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
)


def _listed(tokenizer: Tokenizer, step: TokenStep) -> dict[str, float]:
    """A step's ``top_logprobs``: the requested ids if any (as the seed), else the top-k;
    as vLLM does, the chosen token is always listed too."""
    listed = step.requested.items() if step.requested else step.top
    top: dict[str, float] = {}
    for i, value in listed:
        top.setdefault(tokenizer.decode([i]), value)
    top.setdefault(tokenizer.decode([step.token]), step.logprob)
    return top


def completion_logprobs(tokenizer: Tokenizer, reported: ReportedTokens) -> CompletionLogprobs:
    """The legacy completions ``logprobs`` object of the reported tokens."""
    steps = reported.steps
    return CompletionLogprobs(
        tokens=[tokenizer.decode([i]) for i in reported.token_ids],
        token_logprobs=[None if step is None else step.logprob for step in steps],
        top_logprobs=[None if step is None else _listed(tokenizer, step) for step in steps],
        text_offset=reported.text_offset,
    )


def chat_logprobs(tokenizer: Tokenizer, reported: ReportedTokens) -> ChatLogprobs:
    content = []
    for i, step in zip(reported.token_ids, reported.steps, strict=True):
        assert step is not None  # chat reports generated tokens only
        tops = [ChatTopLogprob(token=t, logprob=v) for t, v in _listed(tokenizer, step).items()]
        content.append(
            ChatTokenLogprob(token=tokenizer.decode([i]), logprob=step.logprob, top_logprobs=tops)
        )
    return ChatLogprobs(content=content)
