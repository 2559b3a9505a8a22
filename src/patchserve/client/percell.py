"""The client-side per-cell sweep (``server_side=False``).

Instead of one ``POST /v1/patch_sweep``, the client fans out one
``POST /v1/completions`` per cell (bounded asyncio concurrency): the corrupt
prompt, ``max_tokens=1``, ``temperature=0`` and one patch entry
``{layer, hook, dest_position, source_run, source_position}``, reading the exact
log-probabilities of the graded ids (``logprob_token_ids``) at the last prompt
position. It is the slow, independent cross-check of the server's sweep engine
and needs only the public completion API.

Nothing is re-implemented here: layers and heads are parsed by
``patchserve.wire.axes``, spans resolved by ``patchserve.text.spans``,
positions paired by ``patchserve.text.alignment.align``, cells graded by
``patchserve.wire.metrics.Grading`` and the answer assembled as the wire's
``SweepBody`` — the server's own definitions, all torch-free.

Grading from log-probabilities: for every metric but ``kl`` only the answer
and foil are fetched per cell (log p(answer), and logit(answer) −
logit(foil) = log p(answer) − log p(foil)). ``kl`` fetches the whole
vocabulary (its size from ``GET /v1/models``).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from patchserve.client.errors import APIResponseError
from patchserve.client.progress import OnCell, ProgressBar, with_progress
from patchserve.client.results import SweepResult
from patchserve.errors import InvalidArgument
from patchserve.text.alignment import align
from patchserve.text.spans import SpanError, expand_positions
from patchserve.wire.axes import not_one_token, parse_heads, parse_hooks, parse_layers
from patchserve.wire.completions import CompletionResponse
from patchserve.wire.grids import assemble_grid
from patchserve.wire.metrics import (
    Grading,
    check_metric,
    kl_divergence,
    log_softmax,
    recovered_raw,
)
from patchserve.wire.sweep import (
    UNALIGNED,
    AlignmentSummary,
    Argmax,
    Baseline,
    Baselines,
    CellEvent,
    SkippedCell,
    SweepBody,
    Timing,
)

if TYPE_CHECKING:
    from patchserve.client.results import CleanRun
    from patchserve.client.study import AsyncPatchStudy


class _Graded(NamedTuple):
    layer: int
    position: int
    head: int | None
    value: float | None


@dataclass
class _ClientGrading(Grading):
    """The shared metric definitions, told whether the clean distribution was fetched."""

    clean_distribution: bool = False

    def has_clean_distribution(self) -> bool:
        return self.clean_distribution


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
        progress: bool = False,
    ) -> None:
        self.study, self.run, self.hook = study, run, hook
        self.corrupt_prompt, self.layers_spec, self.positions_spec = (
            corrupt_prompt,
            layers,
            positions,
        )
        self.heads_spec, self.answer_token, self.foil_token = heads, answer_token, foil_token
        self.metric, self.alpha, self.mask = metric, float(alpha), mask
        self.bar = ProgressBar() if progress else None
        self.on_cell = with_progress(on_cell, self.bar)
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
            spaced = None
            if not value.startswith(" "):
                spaced = (await self.study.tokenize(" " + value, add_special_tokens=False))[
                    "tokens"
                ]
            raise ValueError(not_one_token(param, value, ids, spaced))
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
        out = await self.study._request("POST", "/v1/completions", CompletionResponse, json=body)
        steps = out.choices[0].logprob_token_ids if out.choices else None
        if not steps:
            raise APIResponseError(
                "the completion has no logprob_token_ids for the first generated token"
            )
        return {int(k): float(v) for k, v in steps[0].items()}

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
        try:
            return await self._run_sweep()
        finally:
            if self.bar is not None:
                self.bar.close()

    async def _run_sweep(self) -> SweepResult:
        started = time.perf_counter()
        study, run, hook = self.study, self.run, self.hook
        info = await study.model_info()
        n_layers, n_heads, vocab = info["num_layers"], info["num_heads"], info["vocab_size"]
        try:
            check_metric(self.metric)
            parse_hooks(hook, None)
            layers = parse_layers(self.layers_spec, n_layers)
            heads = parse_heads(self.heads_spec, n_heads) if hook == "attn_head" else None
        except InvalidArgument as exc:
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

        clean_lp_ids = every if self.metric == "kl" else graded
        clean_row = np.array([clean_lp[i] for i in clean_lp_ids])
        clean_logprobs = log_softmax(clean_row) if self.metric == "kl" else None

        def scores(lp: dict[int, float]) -> tuple[float, float | None, float | None]:
            """(log p(answer), logit difference, KL(clean ‖ this)) of one next-token report."""
            diff = lp[answer] - lp[foil] if foil is not None else None
            kl = None
            if clean_logprobs is not None:
                row = log_softmax(np.array([[lp[i] for i in every]]))
                kl = float(kl_divergence(clean_logprobs, row)[0])
            return lp[answer], diff, kl

        def graded_value(grading: Grading, lp: dict[int, float]) -> float:
            a, d, k = scores(lp)
            return float(
                grading.score(
                    np.array([a]),
                    None if d is None else np.array([d]),
                    None if k is None else np.array([k]),
                )[0]
            )

        def raw(lp: dict[int, float]) -> float:
            a, d, _ = scores(lp)
            return float(recovered_raw(a, d))

        try:
            grading = _ClientGrading(
                self.metric,
                answer,
                foil,
                clean_score=raw(clean_lp),
                corrupt_score=raw(corrupt_lp),
                clean_distribution=clean_logprobs is not None,
            )
        except InvalidArgument as exc:
            raise ValueError(exc.message) from exc
        if self.metric == "recovered":  # reported raw, as the server does
            assert grading.clean_score is not None and grading.corrupt_score is not None
            clean_value, corrupt_value = grading.clean_score, grading.corrupt_score
        else:
            clean_value = graded_value(grading, clean_lp)
            corrupt_value = graded_value(grading, corrupt_lp)

        # The cells, in the server's order (layer-major, then position, then head).
        cells: list[tuple[int, int, int | None]] = [
            (layer, position, head)
            for layer in layers
            for position in positions
            for head in (heads if heads is not None else [None])
        ]
        total = len(cells)
        values: dict[tuple[int, int, int | None], float | None] = {}
        skipped: list[SkippedCell] = []
        done = 0
        lock = asyncio.Lock()
        limit = asyncio.Semaphore(max(1, study.max_concurrency))

        async def report(cell: tuple[int, int, int | None], value: float | None) -> None:
            nonlocal done
            async with lock:
                values[cell] = value
                done += 1
                event = CellEvent(
                    hook=hook,
                    layer=cell[0],
                    position=cell[1],
                    head=cell[2],
                    value=value,
                    done=done,
                    total=total,
                )
                await _call(self.on_cell, event.model_dump(mode="json"))

        async def one(cell: tuple[int, int, int | None]) -> None:
            layer, position, head = cell
            source = alignment.source_position(position)
            if source is None:
                skipped.append(
                    SkippedCell(
                        hook=hook, layer=layer, position=position, head=head, reason=UNALIGNED
                    )
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
            await report(cell, graded_value(grading, lp))

        async with asyncio.TaskGroup() as group:
            for cell in cells:
                group.create_task(one(cell))

        seconds = time.perf_counter() - started
        answer_token = await study.detokenize([answer])
        foil_token = None if foil is None else await study.detokenize([foil])
        return SweepResult.from_body(
            self._body(
                info=info,
                layers=layers,
                positions=positions,
                heads=heads,
                cells=cells,
                values=values,
                skipped=sorted(
                    skipped, key=lambda s: (layers.index(s.layer), positions.index(s.position or 0))
                ),
                alignment=AlignmentSummary.of(alignment, run.token_ids, corrupt_ids),
                tokens=tokens,
                answer=answer,
                answer_token=answer_token,
                foil_token=foil_token,
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
        skipped: list[SkippedCell],
        alignment: AlignmentSummary,
        tokens: list[str],
        answer: int,
        answer_token: str,
        foil_token: str | None,
        foil: int | None,
        clean: float,
        corrupt: float,
        seconds: float,
    ) -> SweepBody:
        """The response body the server would have sent (its wire model)."""
        graded = [_Graded(*cell, values.get(cell)) for cell in cells]
        grid, top = assemble_grid(graded, layers, positions, heads, self.metric)
        best = None
        if top is not None and top.value is not None:
            best = Argmax(layer=top.layer, position=top.position, value=top.value, head=top.head)
        return SweepBody(
            model=str(info.get("id")),
            hook=self.hook,
            hooks=[self.hook],
            layers=layers,
            positions=positions,
            heads=heads,
            metric=self.metric,
            answer_token_id=answer,
            answer_token=answer_token,
            answer_token_ids=[answer],
            foil_token_id=foil,
            foil_token_ids=None if foil is None else [foil],
            foil_token=foil_token,
            grid=grid,
            argmax=best,
            clean=clean,
            corrupt=corrupt,
            noise_floor=0.0,  # every cell is the same full forward as the baseline
            skipped=skipped,
            alignment=alignment,
            timing=Timing(
                seconds=seconds,
                cells=len(cells),
                cells_per_second=len(cells) / seconds if seconds > 0 else 0.0,
                cells_computed=len(cells) - len(skipped),
                cells_free=0,
            ),
            tokens=tokens,
            auto_captured=False,
            captured_source_run=None,
            source_run=self.run.run,
            baselines=Baselines(
                clean=Baseline(value=clean, top_logprobs=[]),
                corrupt=Baseline(value=corrupt, top_logprobs=[]),
            ),
        )
