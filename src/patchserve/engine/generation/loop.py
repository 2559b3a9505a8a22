"""The decode loop of text generation with interventions (``/v1/completions``).

:func:`generate` prefills the prompt once (keeping its keys and values), then
decodes one token per pass on top of that cache; the prompt is never
recomputed. Every pass carries a :class:`~patchserve.models.hooks.HookContext`:

* **patches** (``GenerationRequest.edits``) address *absolute* positions, so an
  edit at a position ``>= len(prompt)`` applies on the decoding pass that
  computes that position — the pass that feeds generated token
  ``position - len(prompt)`` and predicts the next one;
* **steering** (``GenerationRequest.steer``) adds ``scale * vector`` at every
  position a pass computes, prompt and generated tokens alike.

Sampling follows the OpenAI semantics: ``temperature == 0`` is greedy,
otherwise ``softmax(logits / temperature)`` restricted to the nucleus
``top_p``, drawn with a CPU ``torch.Generator`` seeded by ``seed`` (the same
seed gives the same tokens). Reported logprobs are of the model's own
distribution (``log_softmax`` of the raw logits, before temperature).

Stop strings truncate the text before the earliest match (``finish_reason
"stop"``); the returned tokens are those whose text starts before the cut. A
stop token id (e.g. EOS) ends generation and is left out of the tokens and
the text. ``completion_tokens`` counts every token the model produced,
including a stop token and tokens cut by a stop string.

"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from patchserve.engine.generation.cache import KVBuffer
from patchserve.engine.generation.interventions import Interventions
from patchserve.engine.generation.sampling import report_prompt_steps, report_step, sample
from patchserve.engine.generation.text import Detokenizer, find_stop
from patchserve.engine.generation.types import (
    GenerationRequest,
    GenerationResult,
    ReportedTokens,
    TokenStep,
)
from patchserve.engine.generation.validation import validate_request
from patchserve.models.transformer import Transformer
from patchserve.text.tokenizer import Tokenizer


@torch.inference_mode()
def generate(
    model: Transformer, tokenizer: Tokenizer, request: GenerationRequest
) -> GenerationResult:
    """Generate a completion of ``request.prompt_ids`` with the request's interventions."""
    validate_request(model, request)
    prompt = [int(i) for i in request.prompt_ids]
    completion = _Completion.start(tokenizer, prompt, request)
    prompt_steps = _decode(model, request, prompt, completion)
    completion.close()
    return completion.result(request, prompt, prompt_steps)


def _decode(
    model: Transformer, request: GenerationRequest, prompt: list[int], completion: _Completion
) -> list[TokenStep | None]:
    """Prefill the prompt, then sample and decode into ``completion`` until it ends.

    Returns the prompt's own steps (``echo`` with ``logprobs``; else empty).
    """
    t0, max_tokens, k = len(prompt), request.max_tokens, request.logprobs
    echo_logprobs = request.echo and k is not None
    if max_tokens == 0 and not echo_logprobs:
        return []
    device = model.device
    hooks = Interventions(request, t0, device)
    out = model.prefill(torch.tensor([prompt], device=device), hooks.context(0, t0))
    prompt_steps = (
        report_prompt_steps(model, out.hidden, prompt, k) if echo_logprobs and k is not None else []
    )
    if max_tokens == 0:
        return prompt_steps
    cache = KVBuffer(out.cache, t0 + max_tokens)
    generator = _generator(request.seed)
    requested = [int(i) for i in request.logprob_token_ids]
    temperature, top_p = float(request.temperature), float(request.top_p)
    while True:
        logits = out.logits[0].float().cpu()
        token = sample(logits, temperature, top_p, generator)
        if completion.accept(token, logits, k, requested) or completion.count == max_tokens:
            return prompt_steps
        position = t0 + completion.count - 1
        out = model.extend(
            torch.tensor([[token]], device=device), cache.view(), hooks.context(position, 1)
        )
        cache.append(out.cache)


def _generator(seed: int | None) -> torch.Generator:
    """The CPU generator of the sampling: seeded by the request, else from OS entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**64)
    return generator


@dataclass
class _Completion:
    """The tokens, steps and text a decode loop has produced so far, and how it ended."""

    detok: Detokenizer
    prompt_text: str
    prompt_offsets: list[int]
    stops: list[str]
    stop_ids: set[int]
    steps: list[TokenStep] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    produced: int = 0  # every token the model produced, stop tokens and cut ones included
    finish: Literal["stop", "length"] = "length"
    cut: int | None = None  # where a stop string cuts the text

    @classmethod
    def start(
        cls, tokenizer: Tokenizer, prompt: list[int], request: GenerationRequest
    ) -> _Completion:
        detok = Detokenizer(tokenizer, prompt, 0 if request.echo else len(prompt))
        prompt_offsets = [detok.push(i) for i in prompt] if request.echo else []
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop)
        stop_ids = {int(i) for i in request.stop_token_ids}
        return cls(detok, detok.text, prompt_offsets, stops, stop_ids)

    @property
    def count(self) -> int:
        return len(self.generated)

    def accept(self, token: int, logits: torch.Tensor, k: int | None, requested: list[int]) -> bool:
        """Record a sampled token; True when generation ends on it (stop id or stop string)."""
        self.produced += 1
        if token in self.stop_ids:
            self.finish = "stop"
            return True
        self.steps.append(report_step(logits, token, k, requested))
        self.generated.append(token)
        before = len(self.detok.text)
        self.offsets.append(self.detok.push(token))
        return self._stopped(before)

    def _stopped(self, before: int) -> bool:
        """Whether a stop string now ends in the text past ``before`` (sets the cut)."""
        if self.stops:
            self.cut = find_stop(self.detok.text, self.stops, before, len(self.prompt_text))
            if self.cut is not None:
                self.finish = "stop"
                return True
        return False

    def close(self) -> None:
        """Flush the detokenizer (a stop string may end in its tail); drop tokens past a cut."""
        if self.cut is None:
            before = len(self.detok.text)
            self.detok.flush()
            if len(self.detok.text) > before:
                self._stopped(before)
        if self.cut is not None:
            kept = sum(1 for offset in self.offsets if offset < self.cut)
            del self.generated[kept:], self.steps[kept:], self.offsets[kept:]

    def result(
        self, request: GenerationRequest, prompt: list[int], prompt_steps: list[TokenStep | None]
    ) -> GenerationResult:
        # With echo the text (and every offset) covers the prompt, then the completion.
        text = self.detok.text if self.cut is None else self.detok.text[: self.cut]
        logprobs = None
        if request.logprobs is not None:
            if request.echo:
                logprobs = ReportedTokens(
                    [*prompt, *self.generated],
                    [*prompt_steps, *self.steps],
                    [*self.prompt_offsets, *self.offsets],
                )
            else:
                logprobs = ReportedTokens(list(self.generated), [*self.steps], self.offsets)
        return GenerationResult(
            token_ids=self.generated,
            text=text,
            finish_reason=self.finish,
            logprobs=logprobs,
            requested_logprobs=[s.requested for s in self.steps]
            if len(request.logprob_token_ids)
            else None,
            prompt_tokens=len(prompt),
            completion_tokens=self.produced,
            completion_text=text[len(self.prompt_text) :],
            cumulative_logprob=sum(s.logprob for s in self.steps),
        )
