"""The client-side per-cell sweep (``server_side=False``).

Instead of one ``POST /v1/patch_sweep``, the client fans out one
``POST /v1/completions`` per cell (bounded asyncio concurrency): the corrupt
prompt, ``max_tokens=1``, ``temperature=0`` and one patch entry
``{layer, hook, dest_position, source_run, source_position}``, reading the exact
log-probabilities of the graded ids (``logprob_token_ids``) at the last prompt
position. It is the slow, independent cross-check of the server's sweep engine
and needs only the public completion API.

Nothing is re-implemented here: layers and heads are parsed by
``patchserve.engine.request``, spans resolved by ``patchserve.text.spans``,
positions paired by ``patchserve.text.alignment.align`` and cells graded by
``patchserve.engine.metrics.Grader``, the server's own definitions. That makes
this path import torch (lazily, on first use); the server-side path does not.

Grading from log-probabilities: log-probabilities are valid logits (softmax is
shift-invariant), so ``Grader`` can read them directly. For every metric but
``kl`` only the answer and foil are fetched per cell, and the row handed to
``Grader`` is the compact distribution ``[log p(answer), log p(foil), log p(rest)]``
(answer = index 0, foil = index 1): it has the same ``logprob``, ``prob``,
``logit_diff`` and ``recovered`` as the full one. ``kl`` fetches the whole
vocabulary (its size from ``GET /v1/models``).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from patchserve.client.errors import APIResponseError
from patchserve.client.results import SweepResult
from patchserve.text.alignment import align
from patchserve.text.spans import SpanError, expand_positions

if TYPE_CHECKING:
    from patchserve.client.results import CleanRun
    from patchserve.client.study import AsyncPatchStudy

#: The reason the server gives for a destination position with no clean partner.
UNALIGNED = "no aligned clean position (differing middle)"

OnCell = Callable[[dict[str, Any]], Any]


def _engine() -> Any:
    """The shared parsing and metric definitions (imports torch, hence lazily)."""
    from patchserve.engine import metrics, request
    from patchserve.engine.errors import RequestError

    return metrics, request, RequestError


def compact_row(logprobs: dict[int, float], answer: int, foil: int | None) -> list[float]:
    """``[log p(answer), (log p(foil),) log p(everything else)]``: a distribution over 2-3 ids."""
    row = [logprobs[answer]] + ([logprobs[foil]] if foil is not None else [])
    rest = 1.0 - sum(math.exp(v) for v in row)
    row.append(math.log(rest) if rest > 0 else -math.inf)
    return row


async def _call(on_cell: OnCell | None, event: dict[str, Any]) -> None:
    if on_cell is None:
        return
    result = on_cell(event)
    if inspect.isawaitable(result):
        await result


class PerCellSweep:
    """One client-side sweep: validate, resolve, fan out, grade, assemble the response body."""

    def __init__(
        self,
        study: AsyncPatchStudy,
        *,
        corrupt_prompt: str,
        run: CleanRun,
        hook: str,
        layers: Any,
        positions: Any,
        heads: Any,
        answer_token: str | int | None,
        foil_token: str | int | None,
        metric: str,
        alpha: float,
        mask: Any,
        on_cell: OnCell | None,
    ) -> None:
        self.study, self.run, self.hook = study, run, hook
        self.corrupt_prompt, self.layers_spec, self.positions_spec = (
            corrupt_prompt,
            layers,
            positions,
        )
        self.heads_spec, self.answer_token, self.foil_token = heads, answer_token, foil_token
        self.metric, self.alpha, self.mask, self.on_cell = metric, float(alpha), mask, on_cell
        self.requests = 0

    # -- helpers ----------------------------------------------------------------------

    async def _token(self, value: str | int | None, param: str, vocab: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < vocab:
                raise ValueError(f"{param}_id {value} is outside the vocabulary (0-{vocab - 1})")
            return value
        if not isinstance(value, str) or not value:
            raise ValueError(f"{param} must be a non-empty string or a token id")
        ids = (await self.study.tokenize(value, add_special_tokens=False))["tokens"]
        if len(ids) != 1:
            raise ValueError(
                f"{param} {value!r} must be exactly one token; it tokenizes to {len(ids)} "
                f"tokens {ids}. Pass a token id, or include the leading space (e.g. ' Paris')"
            )
        return int(ids[0])

    async def _next_logprobs(
        self, prompt: str, ids: Sequence[int], patch: list[dict[str, Any]] | None = None
    ) -> dict[int, float]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "logprob_token_ids": list(ids),
        }
        if patch:
            body["patch"] = patch
        self.requests += 1
        out = await self.study._request("POST", "/v1/completions", json=body)
        try:
            step = out["choices"][0]["logprob_token_ids"][0]
            return {int(k): float(v) for k, v in step.items()}
        except (KeyError, IndexError, TypeError) as exc:
            raise APIResponseError(
                f"the completion has no logprob_token_ids for the first generated token: {out!r}"
            ) from exc

    def _mask(self) -> dict[str, Any] | None:
        if self.mask is None:
            return None
        if isinstance(self.mask, dict) and set(self.mask) == {"indices"}:
            return {"indices": [int(i) for i in self.mask["indices"]]}
        if isinstance(self.mask, Sequence) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.mask
        ):
            return {"indices": [int(i) for i in self.mask]}
        raise ValueError("the per-cell path takes a mask as a list of dimension indices only")

    # -- the sweep --------------------------------------------------------------------

    async def run_sweep(self) -> SweepResult:
        started = time.perf_counter()
        metrics, request, RequestError = _engine()
        study, run, hook = self.study, self.run, self.hook
        info = await study.model_info()
        n_layers, n_heads, vocab = info["num_layers"], info["num_heads"], info["vocab_size"]
        try:
            metrics.check_metric(self.metric)
            request.parse_hooks(hook, None)
            layers = request.parse_layers(self.layers_spec, n_layers)
            heads = request.parse_heads(self.heads_spec, n_heads) if hook == "attn_head" else None
        except RequestError as exc:
            raise ValueError(exc.message) from exc
        if heads is None and self.heads_spec is not None:
            raise ValueError("heads is only for hook 'attn_head'")
        mask = self._mask()

        # Positions: the corrupt prompt as the server tokenizes it; spans resolved here.
        encoded = await study._encode(self.corrupt_prompt)
        corrupt_ids, tokens = encoded["tokens"], encoded["token_strs"]
        if self.positions_spec is None or self.positions_spec == "all_prompt":
            positions = list(range(len(corrupt_ids)))
        else:
            try:
                positions = expand_positions(
                    self.positions_spec, self.corrupt_prompt, encoded["offsets"], encoded["special"]
                )
            except SpanError as exc:
                raise ValueError(f"positions: {exc}") from exc
            if not positions:
                raise ValueError("positions is empty")

        # The clean run must hold the swept sites.
        captured = run.hooks.get(hook)
        missing = [layer for layer in layers if captured is None or layer not in captured]
        if missing:
            raise ValueError(
                f"run {run.run!r} has no {hook} activations at layer(s) {missing}; "
                f"capture them with capture_clean(..., hooks=[{hook!r}])"
            )
        alignment = align(run.token_ids, corrupt_ids)
        run_positions = set(run.positions)

        answer = await self._token(self.answer_token, "answer_token", vocab)
        foil = await self._token(self.foil_token, "foil_token", vocab)
        if self.metric == "logit_diff" and foil is None:
            raise ValueError("metric 'logit_diff' needs a foil token")

        # Baselines: unpatched completions of the clean and the corrupt prompt.
        every = list(range(vocab))
        graded = [answer] + ([foil] if foil is not None else []) if answer is not None else []
        full = self.metric == "kl" or answer is None
        clean_lp = await self._next_logprobs(run.prompt, every if full else graded)
        if answer is None:  # like the server: grade the clean run's top-1 token
            answer = max(clean_lp, key=clean_lp.__getitem__)
            graded = [answer] + ([foil] if foil is not None else [])
        wanted = every if self.metric == "kl" else graded
        corrupt_lp = await self._next_logprobs(self.corrupt_prompt, wanted)

        import torch

        if self.metric == "kl":

            def row(lp: dict[int, float]) -> Any:
                return torch.tensor([[lp[i] for i in every]], dtype=torch.float64)

            g_answer, g_foil = answer, foil
        else:

            def row(lp: dict[int, float]) -> Any:
                return torch.tensor([compact_row(lp, answer, foil)], dtype=torch.float64)

            g_answer, g_foil = 0, (1 if foil is not None else None)
        clean_row, corrupt_row = row(clean_lp), row(corrupt_lp)
        try:
            grader = metrics.Grader(
                metric=self.metric,
                answer=g_answer,
                foil=g_foil,
                clean_logprobs=torch.log_softmax(clean_row[0], dim=-1),
                clean_score=float(metrics.raw_score(clean_row, g_answer, g_foil)[0]),
                corrupt_score=float(metrics.raw_score(corrupt_row, g_answer, g_foil)[0]),
            )
        except RequestError as exc:
            raise ValueError(exc.message) from exc
        clean_value = float(grader(clean_row)[0])
        corrupt_value = float(grader(corrupt_row)[0])

        # The cells, in the server's order (layer-major, then position, then head).
        cells: list[tuple[int, int, int | None]] = [
            (layer, position, head)
            for layer in layers
            for position in positions
            for head in (heads if heads is not None else [None])
        ]
        total = len(cells)
        values: dict[tuple[int, int, int | None], float | None] = {}
        skipped: list[dict[str, Any]] = []
        done = 0
        lock = asyncio.Lock()
        limit = asyncio.Semaphore(max(1, study.max_concurrency))

        async def report(cell: tuple[int, int, int | None], value: float | None) -> None:
            nonlocal done
            async with lock:
                values[cell] = value
                done += 1
                event: dict[str, Any] = {
                    "type": "cell",
                    "hook": hook,
                    "layer": cell[0],
                    "position": cell[1],
                    "value": value,
                    "done": done,
                    "total": total,
                }
                if cell[2] is not None:
                    event["head"] = cell[2]
                await _call(self.on_cell, event)

        async def one(cell: tuple[int, int, int | None]) -> None:
            layer, position, head = cell
            source = alignment.source_position(position)
            if source is None:
                skipped.append(
                    {"hook": hook, "layer": layer, "position": position, "reason": UNALIGNED}
                )
                await report(cell, None)
                return
            if source not in run_positions:
                raise ValueError(f"run {run.run!r} did not capture position {source}")
            entry: dict[str, Any] = {
                "layer": layer,
                "hook": hook,
                "dest_position": position,
                "source_run": run.run,
                "source_position": source,
                "alpha": self.alpha,
            }
            if head is not None:
                entry["head"] = head
            if mask is not None:
                entry["mask"] = mask
            async with limit:
                lp = await self._next_logprobs(self.corrupt_prompt, wanted, [entry])
            await report(cell, float(grader(row(lp))[0]))

        async with asyncio.TaskGroup() as group:
            for cell in cells:
                group.create_task(one(cell))

        seconds = time.perf_counter() - started
        return SweepResult.from_body(
            self._body(
                info=info,
                layers=layers,
                positions=positions,
                heads=heads,
                cells=cells,
                values=values,
                skipped=sorted(
                    skipped,
                    key=lambda s: (layers.index(s["layer"]), positions.index(s["position"])),
                ),
                alignment=alignment.to_json(),
                tokens=tokens,
                answer=answer,
                foil=foil,
                clean=clean_value,
                corrupt=corrupt_value,
                seconds=seconds,
            ),
            server_side=False,
        )

    def _body(
        self,
        *,
        info: dict[str, Any],
        layers: list[int],
        positions: list[int],
        heads: list[int] | None,
        cells: list[tuple[int, int, int | None]],
        values: dict[tuple[int, int, int | None], float | None],
        skipped: list[dict[str, Any]],
        alignment: dict[str, Any],
        tokens: list[str],
        answer: int,
        foil: int | None,
        clean: float,
        corrupt: float,
        seconds: float,
    ) -> dict[str, Any]:
        """The response body the server would have sent (the same field names)."""
        li = {layer: i for i, layer in enumerate(layers)}
        pi = {p: j for j, p in enumerate(positions)}
        if heads is not None:
            hi = {h: k for k, h in enumerate(heads)}
            grid: list[Any] = [[[None] * len(heads) for _ in positions] for _ in layers]
        else:
            grid = [[None] * len(positions) for _ in layers]
        best: dict[str, Any] | None = None
        for cell in cells:
            layer, position, head = cell
            value = values.get(cell)
            if head is None:
                grid[li[layer]][pi[position]] = value
            else:
                grid[li[layer]][pi[position]][hi[head]] = value
            if value is not None and (best is None or value > best["value"]):
                best = {"layer": layer, "position": position, "value": value}
                if head is not None:
                    best["head"] = head
        body: dict[str, Any] = {
            "object": "patch_sweep",
            "model": info.get("id"),
            "hook": self.hook,
            "hooks": [self.hook],
            "layers": layers,
            "positions": positions,
            "metric": self.metric,
            "answer_token_id": answer,
            "foil_token_id": foil,
            "grid": grid,
            "argmax": best,
            "clean": clean,
            "corrupt": corrupt,
            "noise_floor": 0.0,  # every cell is the same full forward as the baseline
            "skipped": skipped,
            "alignment": alignment,
            "timing": {
                "seconds": seconds,
                "cells": len(cells),
                "cells_per_second": len(cells) / seconds if seconds > 0 else 0.0,
                "requests": self.requests,
            },
            "tokens": tokens,
            "auto_captured": False,
            "captured_source_run": None,
            "source_run": self.run.run,
            "baselines": {"clean": {"value": clean}, "corrupt": {"value": corrupt}},
        }
        if heads is not None:
            body["heads"] = heads
        return body
