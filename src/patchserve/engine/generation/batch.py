"""Batched generation's parts: the **executor** (:class:`BlockExecutor`: rows → logits on the
runtime, on a view of one preallocated :class:`~patchserve.models.state.KVBlock`), the
rows' interventions merged into one pass (:func:`merge_edits`) and **per-row
post-processing** (:class:`_Row`: sample with the row's own ``torch.Generator``, stop
strings / stop ids / ``max_tokens``, reports, streamed text). The planner
(:mod:`.planner`, pure) and the continuous-batching loop that joins them
(:mod:`.scheduler`, :func:`~patchserve.engine.generation.scheduler.generate_batch`) use
them; docs/architecture.md ("Batched generation") draws the whole.

Each row carries its own interventions (patches at absolute positions, steering
at every position it computes), addressed to its row of the pass: one prompt's
patch or vector never touches another row. A row's tokens and logprobs are
those of :func:`~patchserve.engine.generation.generate` on its prompt alone (up to
float rounding of batched kernels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from patchserve.engine.generation.interventions import Interventions
from patchserve.engine.generation.loop import _Completion, generate
from patchserve.engine.generation.sampling import sample
from patchserve.engine.generation.types import GenerationRequest, GenerationResult, TokenStep
from patchserve.models.hooks import HookContext, SiteEdit
from patchserve.models.state import KVBlock
from patchserve.models.transformer import Transformer
from patchserve.text.tokenizer import Tokenizer


def merge_edits(per_row: Iterable[list[SiteEdit]]) -> list[SiteEdit]:
    """The edits of several rows as few :class:`SiteEdit`\\ s: the ``j``-th edit of a kind at
    a site of every row merged into one (rows never overlap, so the result is exact and
    each row's own edits keep their order)."""
    groups: dict[tuple[int, str, str, int], list[SiteEdit]] = {}
    for edits in per_row:
        seen: dict[tuple[int, str, str], int] = {}
        for e in edits:
            site = (e.layer, e.hook, e.kind)
            j = seen.get(site, 0)
            seen[site] = j + 1
            groups.setdefault((*site, j), []).append(e)
    out: list[SiteEdit] = []
    for group in groups.values():
        out.extend(_concat(group))
    return out


def _concat(group: list[SiteEdit]) -> list[SiteEdit]:
    first = group[0]
    if len(group) == 1 or any(
        e.source.dtype != first.source.dtype or e.source.device != first.source.device
        for e in group
    ):
        return group
    masks = None
    if any(e.mask is not None for e in group):  # mask 1: weight == alpha, exactly
        masks = torch.cat([torch.ones_like(e.source) if e.mask is None else e.mask for e in group])
    heads = None if first.heads is None else torch.cat([e.heads for e in group])  # type: ignore[misc]
    return [
        SiteEdit(
            first.layer,
            first.hook,
            torch.cat([e.rows for e in group]),
            torch.cat([e.positions for e in group]),
            torch.cat([e.source for e in group]),
            torch.cat([e.alpha for e in group]),
            masks,
            heads,
            first.kind,
        )
    ]


class BlockExecutor:
    """Rows → logits on the runtime; each pass on a view of the rows' key/value block."""

    def __init__(self, model: Transformer, gate: Callable[[], AbstractContextManager[Any]]) -> None:
        self.model = model
        self.gate = gate

    def prefill(
        self, block: KVBlock, prompts: list[list[int]], edits: list[SiteEdit]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-token logits ``[rows, V]`` and hidden ``[rows, tmax, d]`` of the prompts,
        their keys written into ``block``'s rows (one per prompt, from position 0)."""
        device = self.model.device
        tmax = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), tmax, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        offsets = torch.zeros(len(prompts), dtype=torch.long, device=device)
        with self.gate():
            out = self.model.run_on_block(
                ids.to(device), offsets, lengths, block, HookContext.build(edits)
            )
        return out.logits, out.hidden

    def step(
        self, block: KVBlock, tokens: list[int], positions: list[int], edits: list[SiteEdit]
    ) -> torch.Tensor:
        """Logits ``[rows, V]`` after feeding each row's token at its position."""
        device = self.model.device
        ids = torch.tensor(tokens, device=device)[:, None]
        offsets = torch.tensor(positions, device=device)
        ones = torch.ones_like(offsets)
        with self.gate():
            out = self.model.run_on_block(ids, offsets, ones, block, HookContext.build(edits))
        return out.logits


Finish = Literal["stop", "length"]
Listener = Callable[[int, str, Finish | None], None]
"""Told ``(choice, new_text, finish_reason)`` as rows produce text (``finish_reason`` set
once, on a row's last call): what a stream sends."""


@dataclass
class _Row:
    """One sequence being decoded: its request, interventions, sampler and completion."""

    index: int  # the row's choice (prompt-major, n samples each)
    request: GenerationRequest
    prompt: list[int]
    hooks: Interventions
    completion: _Completion
    generator: torch.Generator
    requested: list[int]
    prompt_steps: list[TokenStep | None]
    token: int = -1  # the last sampled token: the next one to feed
    sent: int = 0  # characters of text already released to a listener

    @property
    def position(self) -> int:
        """The position of the token fed next."""
        return len(self.prompt) + self.completion.count - 1

    def accept(self, logits: torch.Tensor) -> bool:
        """Sample this row's next token; True when the row ends on it."""
        req = self.request
        self.token = sample(logits, float(req.temperature), float(req.top_p), self.generator)
        ended = self.completion.accept(self.token, logits, req.logprobs, self.requested)
        return ended or self.completion.count == req.max_tokens

    def release(self, listener: Listener, ended: bool) -> None:
        """Tell ``listener`` the text past what it has: while decoding, all but a tail that
        may still grow into a stop string (which cuts it); on the row's end, the rest."""
        c = self.completion
        if ended:
            c.close()
        text = c.detok.text if c.cut is None else c.detok.text[: c.cut]
        end = len(text)
        if not ended and c.stops:
            end = max(self.sent, end - max(len(s) for s in c.stops) + 1)
        delta, self.sent = text[self.sent : end], end
        if delta or ended:
            listener(self.index, delta, c.finish if ended else None)

    def result(self) -> GenerationResult:
        self.completion.close()
        return self.completion.result(self.request, self.prompt, self.prompt_steps)


def one_at_a_time(
    model: Transformer,
    tokenizer: Tokenizer,
    requests: Sequence[GenerationRequest],
    n: int,
    listener: Listener | None,
    gate: Callable[[], AbstractContextManager[Any]],
) -> list[GenerationResult]:
    """Each row decoded alone (a runtime without a key/value block), text told as it ends."""
    results: list[GenerationResult] = []
    for request in requests:
        for j in range(n):
            seed = None if request.seed is None else request.seed + j
            with gate():
                result = generate(model, tokenizer, dataclasses.replace(request, seed=seed))
            if listener is not None:
                listener(len(results), result.text, result.finish_reason)
            results.append(result)
    return results
