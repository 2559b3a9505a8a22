"""What a generation is asked to do and what it reports (domain objects, no wire shapes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from patchserve.models.hooks import SiteEdit


@dataclass
class SteerVector:
    """Additive steering: ``h += scale * vector`` at every position (prompt and generated).

    ``head`` selects the query head for ``attn_head`` (``vector`` is then
    ``head_dim`` wide); every other hook takes a ``hidden_size`` vector.
    """

    layer: int
    hook: str
    vector: torch.Tensor  # [width]
    scale: float = 1.0
    head: int | None = None


@dataclass
class GenerationRequest:
    """One completion request, already tokenized (see the module docstring for semantics)."""

    prompt_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()  # stop strings
    stop_token_ids: Sequence[int] = ()  # e.g. EOS: ends generation, not included
    logprobs: int | None = None  # top-k logprobs per token (OpenAI legacy completions)
    logprob_token_ids: Sequence[int] = ()  # exact logprobs of these ids at each generated step
    echo: bool = False  # prepend the prompt (text, and tokens/logprobs when logprobs is set)
    edits: Sequence[SiteEdit] = ()  # absolute positions; rows are 0
    steer: Sequence[SteerVector] = ()


@dataclass
class ReportedTokens:
    """Tokens with their steps (None: the first prompt token) and offsets into the text."""

    token_ids: list[int]
    steps: list[TokenStep | None]
    text_offset: list[int]


@dataclass
class GenerationResult:
    """What one :func:`generate` call produced.

    ``text`` is the OpenAI ``choices[i].text``: the prompt text followed by the
    completion when ``echo`` is set, else the completion alone
    (``completion_text``). ``logprobs`` (when ``logprobs`` was asked for)
    reports every token of ``text`` with the distribution it was drawn from,
    the prompt tokens first when ``echo`` is set (the first prompt token has
    no step). ``requested_logprobs[i]`` maps each id of ``logprob_token_ids``
    to its logprob at generated token ``i``. The server shapes these for the
    wire (``patchserve.wire.completions``).
    """

    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: ReportedTokens | None
    requested_logprobs: list[dict[int, float]] | None
    prompt_tokens: int
    completion_tokens: int
    completion_text: str = ""
    cumulative_logprob: float = 0.0  # of the returned tokens (``best_of`` ranks by its mean)


@dataclass
class TokenStep:
    """The distribution one token was drawn from, as reported."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    requested: dict[int, float] = field(default_factory=dict)
