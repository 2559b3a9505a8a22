"""Sampling a token (greedy, temperature, nucleus) and reporting its distribution."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patchserve.engine.generation.types import TokenStep
from patchserve.models.transformer import Transformer

PROMPT_LOGPROB_CHUNK = 512  # prompt positions unembedded at once for echo logprobs


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """One token id from ``logits`` ``[V]`` (CPU float32)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the strictly likelier tokens
        keep = before < top_p
        keep[0] = True
        sorted_p, order = sorted_p[keep], order[keep]
    else:
        sorted_p, order = probs, None
    cdf = torch.cumsum(sorted_p, 0)
    u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
    i = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[0] - 1)
    return int(order[i]) if order is not None else i


def report_step(
    logits: torch.Tensor,
    token: int,
    k: int | None,
    requested: Sequence[int],
) -> TokenStep:
    """Report the model's distribution ``log_softmax(logits)`` at one generated token."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    step = TokenStep(token=token, logprob=float(lp[token]))
    if k:
        values, ids = torch.topk(lp, k)
        step.top = list(zip(ids.tolist(), values.tolist(), strict=True))
    if requested:
        chosen = lp[torch.tensor(list(requested), dtype=torch.long)].tolist()
        step.requested = dict(zip(requested, chosen, strict=True))
    return step


def report_prompt_steps(
    model: Transformer, hidden: torch.Tensor, prompt: list[int], k: int
) -> list[TokenStep | None]:
    """Logprob of each prompt token given its prefix (``None`` for the first)."""
    steps: list[TokenStep | None] = [None]
    t = len(prompt)
    for a in range(0, t - 1, PROMPT_LOGPROB_CHUNK):
        b = min(t - 1, a + PROMPT_LOGPROB_CHUNK)
        logits = model.unembed(hidden[0, a:b]).float().cpu()
        for j in range(b - a):
            steps.append(report_step(logits[j], prompt[a + j + 1], k, ()))
    return steps
