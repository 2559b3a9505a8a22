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
    t0 = len(prompt)
    max_tokens = request.max_tokens
    k = request.logprobs
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    stop_ids = {int(i) for i in request.stop_token_ids}
    requested = [int(i) for i in request.logprob_token_ids]
    echo_logprobs = request.echo and k is not None
    device = model.device
    hooks = Interventions(request, t0, device)
    generator = torch.Generator()
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed % 2**64)

    prompt_steps: list[TokenStep | None] = []
    steps: list[TokenStep] = []
    generated: list[int] = []
    produced = 0
    finish: Literal["stop", "length"] = "length"
    detok = Detokenizer(tokenizer, prompt, 0 if request.echo else t0)
    prompt_offsets = [detok.push(i) for i in prompt] if request.echo else []
    prompt_text = detok.text
    completion_offsets: list[int] = []
    cut: int | None = None

    if max_tokens > 0 or echo_logprobs:
        out = model.prefill(torch.tensor([prompt], device=device), hooks.context(0, t0))
        if echo_logprobs:
            assert k is not None
            prompt_steps = report_prompt_steps(model, out.hidden, prompt, k)
        cache = KVBuffer(out.cache, t0 + max_tokens) if max_tokens > 0 else None
        while max_tokens > 0:
            assert cache is not None
            logits = out.logits[0].float().cpu()
            token = sample(logits, float(request.temperature), float(request.top_p), generator)
            produced += 1
            if token in stop_ids:
                finish = "stop"
                break
            steps.append(report_step(logits, token, k, requested))
            generated.append(token)
            before = len(detok.text)
            completion_offsets.append(detok.push(token))
            if stops:
                cut = find_stop(detok.text, stops, before, len(prompt_text))
                if cut is not None:
                    finish = "stop"
                    break
            if len(generated) == max_tokens:
                break
            position = t0 + len(generated) - 1
            out = model.extend(
                torch.tensor([[token]], device=device), cache.view(), hooks.context(position, 1)
            )
            cache.append(out.cache)

    if cut is None:
        before = len(detok.text)
        detok.flush()
        if stops and len(detok.text) > before:
            cut = find_stop(detok.text, stops, before, len(prompt_text))
            if cut is not None:
                finish = "stop"
    if cut is not None:
        kept = sum(1 for offset in completion_offsets if offset < cut)
        del generated[kept:], steps[kept:], completion_offsets[kept:]
    # With echo the text (and every offset) covers the prompt, then the completion.
    text = detok.text if cut is None else detok.text[:cut]
    completion_text = text[len(prompt_text) :]

    logprobs = None
    if k is not None:
        if request.echo:
            logprobs = ReportedTokens(
                [*prompt, *generated],
                [*prompt_steps, *steps],
                [*prompt_offsets, *completion_offsets],
            )
        else:
            logprobs = ReportedTokens(list(generated), [*steps], completion_offsets)
    return GenerationResult(
        token_ids=generated,
        text=text,
        finish_reason=finish,
        logprobs=logprobs,
        requested_logprobs=[s.requested for s in steps] if requested else None,
        prompt_tokens=t0,
        completion_tokens=produced,
        completion_text=completion_text,
    )
