"""The generation service of ``/v1/completions`` and ``/v1/chat/completions``: a parsed
request's patches, steering vectors and captures turned into engine requests
(:class:`~patchserve.engine.generation.GenerationRequest`, checked before any model work),
run by the model's :class:`~patchserve.engine.generation.GenerationScheduler` (continuous
batching: every prompt and sample of every concurrent request decodes in one batch, rows
joining and leaving between steps, the fair gate taken per pass), and streamed as events
when asked. The routes only parse and shape the wire models.

Patch entries become runtime edits at absolute positions (positions past the
prompt address generated tokens and apply on the step that computes them),
``steer`` entries additive vectors at every position, ``capture`` a stored
run of the prompt.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from prometheus_client import Gauge

from patchserve.cancel import cancel_scope
from patchserve.engine import InvalidArgument, capture_run, check_run_name
from patchserve.engine.generation import (
    GenerationRequest,
    GenerationResult,
    GenerationScheduler,
    SteerVector,
    generate_batch,
    validate_request,
)
from patchserve.engine.generation.batch import Finish, Listener
from patchserve.engine.sites import check_site
from patchserve.engine.vectors import mask_vector, table_row, unpack_table
from patchserve.errors import Cancelled, Conflict
from patchserve.models import make_edit
from patchserve.models.hooks import SiteEdit
from patchserve.server.routes.sources import capture_hooks
from patchserve.server.state import ServerState
from patchserve.wire.requests import Interventions, PatchEntry, SteerEntry

MAX_SAMPLES = 16  # n and best_of per prompt

_SCHEDULERS: weakref.WeakKeyDictionary[ServerState, GenerationScheduler] = (
    weakref.WeakKeyDictionary()
)
_SCHEDULERS_LOCK = threading.Lock()


def scheduler(state: ServerState) -> GenerationScheduler:
    """The server's one generation scheduler (made on first use): every request's rows
    decode in its batch; ``/metrics`` shows its running rows and decoding passes."""
    with _SCHEDULERS_LOCK:
        if state in _SCHEDULERS:
            return _SCHEDULERS[state]
        sched = GenerationScheduler(
            state.model, state.tokenizer, state.gate.turn, state.config.max_batch_tokens
        )
        _SCHEDULERS[state] = sched
        registry = state.metrics.registry
        rows = Gauge("patchserve_generation_rows", "Rows decoding now", registry=registry)
        rows.set_function(lambda: sched.running)
        steps = Gauge("patchserve_generation_steps", "Decoding passes run", registry=registry)
        steps.set_function(lambda: sched.steps)
        return sched


def _inline(table: np.ndarray | None, row: int, width: int, param: str) -> torch.Tensor:
    return torch.from_numpy(table_row(table, row, width, param).copy())


def _module_or_inline(
    state: ServerState,
    module: str | None,
    inline: int | None,
    hook: str,
    layer: int,
    width: int,
    table: np.ndarray | None,
    param: str,
) -> torch.Tensor:
    """A registered module's vector at ``(hook, layer)``, or a row of ``patch_vectors``."""
    if module is not None:
        if not state.modules.exists(module):
            raise InvalidArgument(f"unknown module {module!r}", param)
        return state.modules.vector(module, hook, layer, width, state.model.embed_tokens.weight)
    assert inline is not None
    return _inline(table, inline, width, param)


def _edit(state: ServerState, entry: PatchEntry, table: np.ndarray | None, i: int) -> SiteEdit:
    param = f"patch.{i}"
    width = check_site(state.model.cfg, entry.layer, entry.hook, entry.head, param)
    sources = [
        entry.source_run is not None,
        entry.source_module is not None,
        entry.source_inline is not None,
    ]
    if sum(sources) != 1:
        raise InvalidArgument(
            "a patch entry needs exactly one of source_run, source_module, source_inline", param
        )
    like = state.model.embed_tokens.weight
    if entry.source_run is not None:
        run = state.store.get(check_run_name(entry.source_run, param))
        if run is None:
            raise InvalidArgument(f"source run {entry.source_run!r} not found", param)
        if entry.source_position is None:
            raise InvalidArgument("source_run needs source_position", param)
        row = run.row(entry.hook, entry.layer, entry.source_position)
        if row is None:
            raise InvalidArgument(
                f"run {entry.source_run!r} has no {entry.hook} at layer "
                f"{entry.layer}, position {entry.source_position}",
                param,
            )
        source = row[entry.head] if entry.head is not None else row
    else:
        source = _module_or_inline(
            state,
            entry.source_module,
            entry.source_inline,
            entry.hook,
            entry.layer,
            width,
            table,
            param,
        )
    context = state.model.cfg.max_position_embeddings
    if not 0 <= entry.dest_position < context:
        raise InvalidArgument(
            f"dest_position {entry.dest_position} is outside the model's context (0-{context - 1})",
            f"{param}.dest_position",
        )
    mask = None
    if entry.mask is not None:
        mask = mask_vector(
            entry.mask.indices, entry.mask.inline, width, table, param, f"hook {entry.hook}"
        )
    return make_edit(
        entry.layer,
        entry.hook,
        [0],
        [entry.dest_position],
        source.to(like.dtype).reshape(1, -1),
        alpha=float(entry.alpha),
        mask=None if mask is None else mask[None],
        heads=None if entry.head is None else [entry.head],
    )


def _steer(state: ServerState, entry: SteerEntry, table: np.ndarray | None, i: int) -> SteerVector:
    param = f"steer.{i}"
    width = check_site(state.model.cfg, entry.layer, entry.hook, entry.head, param)
    if (entry.source_module is None) == (entry.source_inline is None):
        raise InvalidArgument("a steer entry needs one of source_module and source_inline", param)
    like = state.model.embed_tokens.weight
    vector = _module_or_inline(
        state,
        entry.source_module,
        entry.source_inline,
        entry.hook,
        entry.layer,
        width,
        table,
        param,
    )
    return SteerVector(
        entry.layer, entry.hook, vector.to(like.dtype), float(entry.scale), entry.head
    )


def _prepare(state: ServerState, req: Interventions) -> tuple[list[SiteEdit], list[SteerVector]]:
    table = unpack_table(req.patch_vectors)
    edits = [_edit(state, e, table, i) for i, e in enumerate(req.patch)]
    steer = [_steer(state, s, table, i) for i, s in enumerate(req.steer)]
    return edits, steer


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _capture(state: ServerState, req: Interventions, prompt: str, ids: list[int]) -> str | None:
    if req.capture is None:
        return None
    spec = req.capture.patch_source
    name = check_run_name(spec.run, "capture") if spec.run else state.store.fresh_name("capture")
    if name in state.store and not spec.overwrite:
        raise Conflict(f"run {name!r} already exists; pass overwrite: true", "capture")
    hooks = capture_hooks(state, spec.hooks)
    positions = None if spec.positions == "all_prompt" else list(spec.positions)
    if positions is not None and any(not 0 <= p < len(ids) for p in positions):
        raise InvalidArgument("capture positions are out of range", "capture")
    run = state.gated(lambda: capture_run(state.model, name, prompt, ids, hooks, positions))
    run.kept = True
    state.store.put(run, overwrite=spec.overwrite)
    return name


def _samples(req: Interventions, best_of: int | None, stream: bool) -> int:
    """Samples generated per prompt (``best_of``, else ``n``), checked."""
    if not 1 <= req.n <= MAX_SAMPLES:
        raise InvalidArgument(f"n must be in 1..{MAX_SAMPLES}, got {req.n}", "n")
    if best_of is None:
        return req.n
    if not req.n <= best_of <= MAX_SAMPLES:
        raise InvalidArgument(
            f"best_of must be in n..{MAX_SAMPLES} (n = {req.n}), got {best_of}", "best_of"
        )
    if stream and best_of != req.n:
        raise InvalidArgument("best_of > n cannot be streamed; use stream: false", "best_of")
    return best_of


def _check_stream(req: Interventions, logprobs: int | None) -> None:
    if not req.stream:
        if req.stream_options is not None:
            raise InvalidArgument("stream_options needs stream: true", "stream_options")
        return
    if logprobs is not None:
        raise InvalidArgument(
            "logprobs are not streamed; use stream: false to have them", "logprobs"
        )
    if req.logprob_token_ids:
        raise InvalidArgument(
            "logprob_token_ids are not streamed; use stream: false to have them",
            "logprob_token_ids",
        )


@dataclass
class Generation:
    """One request's generation, validated: its engine requests and how many samples."""

    state: ServerState
    req: Interventions
    prompts: list[str]
    requests: list[GenerationRequest]
    samples: int  # generated per prompt
    keep: int  # returned per prompt (the best ``keep`` of ``samples``)
    captured: list[str | None] = field(default_factory=list)

    @classmethod
    def prepare(
        cls,
        state: ServerState,
        req: Interventions,
        prompts: list[str],
        encoded: list[list[int]],
        *,
        logprobs: int | None,
        echo: bool,
        best_of: int | None = None,
    ) -> Generation:
        """Every check (reading source runs), before any model work: blocking."""
        samples = _samples(req, best_of, req.stream)
        if samples > 1:  # every sample is a row of the batch: bounded as prompts are
            state.check_prompt_count(len(prompts) * samples, "best_of" if best_of else "n")
        _check_stream(req, logprobs)
        edits, steer = _prepare(state, req)
        eos = state.tokenizer.eos_token_id
        requests = [
            GenerationRequest(
                prompt_ids=ids,
                max_tokens=16 if req.max_tokens is None else req.max_tokens,
                temperature=float(req.temperature),
                top_p=float(req.top_p),
                seed=req.seed,
                stop=_stops(req.stop),
                stop_token_ids=[eos] if eos is not None else [],
                logprobs=logprobs,
                logprob_token_ids=req.logprob_token_ids,
                echo=echo,
                edits=edits,
                steer=steer,
            )
            for ids in encoded
        ]
        for gen in requests:
            validate_request(state.model, gen)  # before the capture stores anything
        return cls(state, req, prompts, requests, samples, req.n)

    def capture(self) -> None:
        """Store each prompt's run when ``capture`` asks (blocking; before the generation,
        so that a refusal is an error answer, not a broken stream)."""
        self.captured = [
            _capture(self.state, self.req, p, r.prompt_ids)
            for p, r in zip(self.prompts, self.requests, strict=True)
        ]

    def run(self, listener: Listener | None = None) -> list[tuple[GenerationResult, str | None]]:
        """Generate every prompt's samples together (blocking); the results prompt-major,
        the best ``keep`` of each prompt's samples, with the prompt's captured run."""
        state = self.state
        if state.model.runtime == "native":
            results = scheduler(state).run(self.requests, self.samples, listener)
        else:  # the transformers runtime: one row at a time, the gate taken per row
            results = generate_batch(
                state.model, state.tokenizer, self.requests, self.samples, listener, state.gate.turn
            )
        out: list[tuple[GenerationResult, str | None]] = []
        captured_runs = self.captured or [None] * len(self.requests)
        for i, captured in enumerate(captured_runs):
            mine = results[i * self.samples : (i + 1) * self.samples]
            if self.keep < self.samples:
                mine = sorted(mine, key=_mean_logprob, reverse=True)[: self.keep]
            out.extend((r, captured) for r in mine)
        return out

    async def stream(self, event: Callable[[int, str, Finish | None], Any]) -> AsyncIterator[Any]:
        """The wire events of the run as it decodes (``event(choice, text, finish)``); a
        consumer that stops (a client gone) stops the rows within one decoding step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        left = threading.Event()

        def listener(index: int, text: str, finish: Finish | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event(index, text, finish))

        def work() -> list[tuple[GenerationResult, str | None]]:
            with cancel_scope(left.is_set):
                return self.run(listener)

        task = asyncio.create_task(self.state.run_blocking(work))

        def finished(t: asyncio.Future[Any]) -> None:
            if not t.cancelled():
                t.exception()  # retrieved here; raised to the consumer by ``result()``
            queue.put_nowait(None)

        task.add_done_callback(finished)
        try:
            while (item := await queue.get()) is not None:
                yield item
            try:
                yield task.result()
            except Cancelled:
                return
        finally:
            left.set()
            if not task.done():
                await asyncio.wait([task])


def _mean_logprob(result: GenerationResult) -> float:
    return result.cumulative_logprob / max(1, len(result.token_ids))
