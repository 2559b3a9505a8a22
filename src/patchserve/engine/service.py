"""The study service: one validated sweep request, run end to end on given resources.

A :class:`Study` takes a ``PatchSweepRequest`` (types already checked by
pydantic) and the resources that serve it (model, tokenizer, run store, named
vectors, the fair gate, limits) and does what a study needs: validation of
everything before any model work, capture of the clean prompt when the source
run is missing, leasing of the source run while the sweep reads it, the sweep,
the baselines, and the clean-up (an auto-captured run is dropped unless
``keep_source``, also after a cancel). The HTTP route, the command line's
in-process path and anything else that runs a study call it; they only turn
its answers into their own shapes (JSON, Server-Sent Events, a terminal
table).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from patchserve.engine.attribution import check_method_scope
from patchserve.engine.corruption import noise_of, normalize
from patchserve.engine.errors import InvalidArgument
from patchserve.engine.noise import noise_summary, run_noised
from patchserve.engine.report import cell_event, start_event, sweep_body
from patchserve.engine.runs import CapturedRun, capture_run, check_run_name
from patchserve.engine.sites import check_context, check_runtime_scope
from patchserve.engine.stream import stream_sweep
from patchserve.engine.study import prepare_sweep, window_span
from patchserve.engine.study_sources import check_module_covers, sweep_masks, vector_source
from patchserve.engine.sweep import Cell, SweepOutcome, SweepSpec, run_sweep
from patchserve.engine.vectors import unpack_table
from patchserve.models import INJECTABLE_HOOKS, ModelConfig, Transformer
from patchserve.text.tokenizer import Encoding, Tokenizer
from patchserve.wire.axes import parse_hooks
from patchserve.wire.base import WireModel
from patchserve.wire.requests import LayerRange, PatchSweepRequest
from patchserve.wire.sweep import StartEvent, SummaryEvent, SweepBody

T = TypeVar("T")


class RunStore(Protocol):
    """Where clean runs live (the server's store; an in-memory dict for the command line)."""

    def get(self, name: str) -> CapturedRun | None: ...
    def put(self, run: CapturedRun, overwrite: bool = False) -> None: ...
    def drop(self, name: str) -> bool: ...
    def lease(self, run: CapturedRun) -> AbstractContextManager[CapturedRun]: ...
    def fresh_name(self, prefix: str = "auto") -> str: ...


class VectorLibrary(Protocol):
    """Named vectors (``source_module``): ``zeros`` and the registered modules."""

    def exists(self, name: str) -> bool: ...
    def vector(
        self, name: str, hook: str, layer: int, width: int, like: torch.Tensor
    ) -> torch.Tensor: ...


class MemoryRuns:
    """A run store in a dict: the command line's (nothing persists, nothing is evicted)."""

    def __init__(self) -> None:
        self.runs: dict[str, CapturedRun] = {}
        self.count = 0

    def get(self, name: str) -> CapturedRun | None:
        return self.runs.get(name)

    def put(self, run: CapturedRun, overwrite: bool = False) -> None:
        self.runs[run.name] = run

    def drop(self, name: str) -> bool:
        return self.runs.pop(name, None) is not None

    @contextmanager
    def lease(self, run: CapturedRun) -> Iterator[CapturedRun]:
        yield run

    def fresh_name(self, prefix: str = "auto") -> str:
        self.count += 1
        return f"{prefix}-{self.count}"


class NoVectors:
    """A library with only the built-in ``zeros``."""

    def exists(self, name: str) -> bool:
        return name == "zeros"

    def vector(
        self, name: str, hook: str, layer: int, width: int, like: torch.Tensor
    ) -> torch.Tensor:
        return torch.zeros(width, dtype=like.dtype, device=like.device)


def _plain_encode(tokenizer: Tokenizer, cfg: ModelConfig) -> Callable[[str, str], Encoding]:
    def encode(prompt: str, param: str) -> Encoding:
        encoding = tokenizer.encode(prompt)
        if not encoding.ids:
            raise InvalidArgument(f"{param} tokenizes to no tokens", param)
        check_context(cfg, len(encoding.ids), param)
        return encoding

    return encode


@dataclass
class StudyResources:
    """What serves a study. ``encode(prompt, param)`` applies the prompt limits; ``gate``
    is entered around every model call (the server's fair scheduler)."""

    model: Transformer
    tokenizer: Tokenizer
    model_name: str
    runs: RunStore = field(default_factory=MemoryRuns)
    vectors: VectorLibrary = field(default_factory=NoVectors)
    encode: Callable[[str, str], Encoding] | None = None
    gate: Callable[[], AbstractContextManager[None]] = nullcontext
    max_batch_tokens: int = 4096
    max_cells: int | None = None
    on_store_change: Callable[[], None] = lambda: None
    # What computes a sweep (run_sweep's signature): in this process, or a Ray replica pool's.
    sweep: Callable[..., SweepOutcome] = run_sweep

    def encoded(self, prompt: str, param: str) -> Encoding:
        return (self.encode or _plain_encode(self.tokenizer, self.model.cfg))(prompt, param)


def _positions(req: PatchSweepRequest) -> Any:
    if not isinstance(req.positions, list):
        return req.positions
    return [p if isinstance(p, int) else p.model_dump() for p in req.positions]


class Study:
    """One validated sweep request: its spec, its source, and what to do afterwards."""

    def __init__(self, res: StudyResources, req: PatchSweepRequest) -> None:
        req = normalize(req)  # corruption 'replace' -> clean_prompt + prompt
        self.res, self.req = res, req
        self.clean_run: CapturedRun | None = None  # the source run (stored or captured)
        self.capture_name: str | None = None
        self.clean_ids: list[int] | None = None
        self.finished = False
        encoding = res.encoded(req.prompt, "prompt")  # the limits, before anything else
        table = unpack_table(req.patch_vectors)
        hooks = parse_hooks(req.hook, req.hooks)
        vector = vector_source(req, res.model, res.vectors, hooks, table)
        if vector is None:
            self._find_or_plan_capture()
        self.spec, self.tokens = prepare_sweep(
            res.model,
            res.tokenizer,
            prompt=req.prompt,
            source=vector if vector is not None else self.clean_run,
            hook=req.hook,
            hooks=req.hooks,
            layers=req.layers.model_dump() if isinstance(req.layers, LayerRange) else req.layers,
            clean_ids=self.clean_ids,
            positions=_positions(req),
            heads=req.heads,
            alpha=float(req.alpha),
            masks=sweep_masks(req.mask, res.model, hooks, table),
            answer_token=req.answer_token,
            answer_token_id=req.answer_token_id,
            foil_token=req.foil_token,
            foil_token_id=req.foil_token_id,
            metric=req.metric,
            per_position=req.per_position,
            clean_baseline=None if req.clean_baseline is None else float(req.clean_baseline),
            max_batch_tokens=res.max_batch_tokens,
            max_cells=res.max_cells,
            window=req.window,
            method=req.method,
            verify_top_k=req.verify_top_k,
        )
        self.noise = noise_of(req, res.tokenizer, encoding)
        check_method_scope(
            req.method, answer_tokens=1, window=1, per_position=True, noise=self.noise is not None
        )
        check_runtime_scope(res.model, req.method, self.noise is not None)
        if req.source_module is not None:
            check_module_covers(res.vectors, res.model, self.spec, req.source_module)

    @property
    def auto_captured(self) -> bool:
        return self.capture_name is not None

    # -- validation -------------------------------------------------------------------

    def _find_or_plan_capture(self) -> None:
        """The stored source run, or the plan to capture ``clean_prompt`` in this call."""
        req = self.req
        if req.source_run is not None:
            check_run_name(req.source_run, "source_run")
            self.clean_run = self.res.runs.get(req.source_run)
        if self.clean_run is not None:
            return
        if req.clean_prompt is None:  # a 400, not a 404, as in the seed
            missing = (
                f"source run {req.source_run!r} not found"
                if req.source_run
                else ("no source given")
            )
            raise InvalidArgument(
                f"{missing}: give clean_prompt to capture it in this call, "
                "or source_module / source_inline for a vector sweep",
                "source_run" if req.source_run else "clean_prompt",
            )
        self.clean_ids = self.res.encoded(req.clean_prompt, "clean_prompt").ids
        self.capture_name = req.source_run or self.res.runs.fresh_name("sweep")

    # -- running ----------------------------------------------------------------------

    def capture(self) -> None:
        """The one-call auto-capture: every injectable hook of the swept layers."""
        if not self.auto_captured:
            return
        name, prompt, ids = self.capture_name, self.req.clean_prompt, self.clean_ids
        assert name is not None and prompt is not None and ids is not None
        layers = window_span(self.spec.layers, self.spec.window, self.res.model.cfg.num_layers)
        offered = self.res.model.offered_hooks
        hooks = dict.fromkeys([h for h in INJECTABLE_HOOKS if h in offered], layers)
        with self.res.gate(), torch.inference_mode():
            run = capture_run(self.res.model, name, prompt, ids, hooks)
        run.kept = self.req.keep_source
        self.res.runs.put(run, overwrite=True)
        self.clean_run = run
        self.spec.source = run

    def finish(self) -> None:
        """Drop an auto-captured run unless asked to keep it (also after a cancel). Once."""
        if self.finished:
            return
        self.finished = True
        if self.capture_name is not None and not self.req.keep_source:
            self.res.runs.drop(self.capture_name)
        self.res.on_store_change()

    def _leased(self) -> AbstractContextManager[Any]:
        return self.res.runs.lease(self.clean_run) if self.clean_run is not None else nullcontext()

    def sweep_then_finish(
        self, on_cell: Callable[[Cell, int, int], None] | None = None
    ) -> SweepOutcome:
        """The captured (or stored, or vector) study's sweep, with its source leased."""
        try:
            with self._leased():
                return self.sweep(on_cell=on_cell)
        finally:
            self.finish()

    def sweep(
        self,
        model: Transformer | None = None,
        spec: SweepSpec | None = None,
        on_cell: Callable[[Cell, int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        gate: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> SweepOutcome:
        """The sweep itself: one pass, or one per noise sample averaged (``run_sweep``'s
        signature, the study's own model, spec and gate by default)."""
        model, spec = model or self.res.model, spec or self.spec
        gate = gate or self.res.gate
        if self.noise is not None:
            return run_noised(model, spec, self.noise, on_cell, cancel, gate)
        sweep = self.res.sweep if spec.method == "exact" else run_sweep  # replicas: exact only
        return sweep(model, spec, on_cell=on_cell, cancel=cancel, gate=gate)

    def run(self, on_cell: Callable[[Cell, int, int], None] | None = None) -> SweepBody:
        """The whole study in this thread: capture, sweep, clean up, the body."""
        try:
            self.capture()
        except BaseException:
            self.finish()
            raise
        return self.body(self.sweep_then_finish(on_cell))

    async def events(
        self,
        run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]],
        on_outcome: Callable[[SweepOutcome], None] = lambda outcome: None,
    ) -> AsyncIterator[WireModel]:
        """The stream of a captured study: start, one cell event per cell, summary.

        The sweep runs through ``run_blocking`` (a worker thread); closing the
        iterator (a client that left) stops it, and the clean-up runs as soon as
        the sweep ends, not when the stream is closed.
        """

        async def run_then_finish(work: Callable[[], T]) -> T:
            try:
                return await run_blocking(work)  # type: ignore[no-any-return]
            finally:
                self.finish()

        try:
            with self._leased():
                yield self.start_event()
                async for item in stream_sweep(
                    self.res.model,
                    self.spec,
                    runner=run_then_finish,
                    gate=self.res.gate,
                    sweep=self.sweep,
                ):
                    if item[0] == "cell":
                        _, cell, done, total = item
                        yield cell_event(cell, done, total, self.spec.method)
                    else:
                        on_outcome(item[1])
                        yield SummaryEvent(**dict(self.body(item[1])))
        finally:
            self.finish()

    # -- answers ----------------------------------------------------------------------

    def body(self, outcome: SweepOutcome) -> SweepBody:
        return sweep_body(
            outcome,
            model_name=self.res.model_name,
            tokenizer=self.res.tokenizer,
            tokens=self.tokens,
            source_run=self.clean_run,
            hooks_given=self.req.hooks is not None,
            auto_captured=self.auto_captured,
            captured_source_run=self.capture_name,
            top_k=self.req.logprobs,
            window=self.spec.window,
            noise=None
            if self.noise is None
            else noise_summary(self.res.model, self.noise, outcome.corrupt_stderr),
        )

    def start_event(self) -> StartEvent:
        return start_event(
            self.spec,
            self.tokens,
            auto_captured=self.auto_captured,
            captured_source_run=self.capture_name,
        )
