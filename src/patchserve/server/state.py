"""Everything the routes share: the model, tokenizer, source store, modules, scheduler."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import Receive

from patchserve.cancel import cancel_scope
from patchserve.engine.service import StudyResources
from patchserve.engine.sites import check_context
from patchserve.engine.sweep import SweepOutcome, run_sweep
from patchserve.errors import InvalidArgument, NotFound, TooLarge
from patchserve.models import LoadedModel, Transformer, load_model, pack_weights
from patchserve.server.config import ServerConfig, default_cache_bytes
from patchserve.server.modules import ModuleRegistry
from patchserve.server.scheduler import FairGate
from patchserve.server.store import RunStore
from patchserve.text.tokenizer import Encoding, Tokenizer

T = TypeVar("T")
log = logging.getLogger("patchserve.server")


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "patchserve_requests", "HTTP requests", ["route", "status"], registry=r
        )
        self.sweeps = Counter("patchserve_sweeps", "Sweeps completed", registry=r)
        self.cells = Counter("patchserve_cells", "Sweep cells graded", registry=r)
        self.cells_per_second = Gauge(
            "patchserve_cells_per_second", "Cells per second of the last sweep", registry=r
        )
        self.queue_depth = Gauge(
            "patchserve_queue_depth", "Model batches waiting or running", registry=r
        )
        self.store_bytes = Gauge("patchserve_store_bytes", "Bytes of resident runs", registry=r)
        self.store_runs = Gauge("patchserve_store_runs", "Stored runs", registry=r)


class ServerState:
    def __init__(self, config: ServerConfig, loaded: LoadedModel, tokenizer: Tokenizer) -> None:
        self.config = config
        self.loaded = loaded
        self.model: Transformer = loaded.model
        self.tokenizer = tokenizer
        budget = config.source_cache_bytes or default_cache_bytes()
        self.store = RunStore(budget, config.source_dir)
        self.modules = ModuleRegistry()
        self.gate = FairGate()
        self.metrics = Metrics()
        self.started = time.time()
        self.model_name = config.served_model_name or loaded.path.name
        self.stopping = threading.Event()  # set when a shutdown's grace period is over
        self.sweep: Callable[..., SweepOutcome] = run_sweep
        if config.replicas > 0:
            from patchserve.engine.replicas import ReplicaPool

            pool = ReplicaPool(
                str(loaded.path),
                config.replicas,
                device=config.device,
                dtype=config.dtype,
                address=config.ray_address,
            )
            self.sweep = pool.run_sweep
            log.info("sweeps run on %d Ray replicas", config.replicas)

    @classmethod
    def from_config(cls, config: ServerConfig) -> ServerState:
        from patchserve.assets import default_model_path

        path = config.model or str(default_model_path())
        loaded = load_model(
            path,
            device=config.device,
            dtype=config.dtype,
            device_map=config.device_map,
            runtime=config.runtime,
        )
        if loaded.fallback is not None:
            log.warning("%s", loaded.fallback)
        log.info("runtime %s; hooks: %s", loaded.runtime, ", ".join(loaded.hooks))
        torch.set_grad_enabled(False)
        start = time.perf_counter()
        packed, total = pack_weights(loaded.model)
        log.info(
            "packed %d of %d projection weights for batch-invariant sweeps in %.2f s",
            packed,
            total,
            time.perf_counter() - start,
        )
        return cls(config, loaded, Tokenizer.from_folder(loaded.path))

    def encode(self, prompt: str, param: str = "prompt") -> Encoding:
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgument(f"{param} must be a non-empty string", param)
        encoding = self.tokenizer.encode(prompt)
        self.check_token_count(len(encoding.ids), param)
        check_context(self.model.cfg, len(encoding.ids), param)
        if not encoding.ids:
            raise InvalidArgument(f"{param} tokenizes to no tokens", param)
        return encoding

    def check_token_count(self, count: int, param: str) -> None:
        """``--max-prompt-tokens`` bounds every token sequence a request hands in or asks for."""
        limit = self.config.max_prompt_tokens
        if count > limit:
            raise TooLarge(f"{param} has {count} tokens; this server allows at most {limit}", param)

    def check_prompt_count(self, count: int, param: str = "prompt") -> None:
        """``--max-prompts`` bounds the prompts of one request."""
        limit = self.config.max_prompts
        if count > limit:
            raise TooLarge(
                f"{param} lists {count} prompts; this server allows at most {limit} per request",
                param,
            )

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """Run model work in a worker thread (the event loop stays free); it stops
        (``Cancelled``) once a shutdown's grace period is over."""

        def stoppable() -> T:
            with cancel_scope(self.stopping.is_set):
                return fn()

        return await anyio.to_thread.run_sync(stoppable)

    async def run_cancellable(self, receive: Receive, fn: Callable[[], T]) -> T:
        """``run_blocking`` that stops (``Cancelled``) soon after the client disconnects:
        ``fn`` runs in a cancel scope that a watcher of the request's messages trips."""
        left = threading.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            left.set()

        def scoped() -> T:
            with cancel_scope(left.is_set):
                return fn()

        watcher = asyncio.create_task(watch())
        try:
            return await self.run_blocking(scoped)
        finally:
            watcher.cancel()

    def gated(self, fn: Callable[[], T]) -> T:
        with self.gate.turn(), torch.inference_mode():
            return fn()

    def study_resources(self) -> StudyResources:
        """What the study service needs of this server: model, store, vectors, gate, limits."""
        return StudyResources(
            model=self.model,
            tokenizer=self.tokenizer,
            model_name=self.model_name,
            runs=self.store,
            vectors=self.modules,
            encode=self.encode,
            gate=self.gate.turn,
            max_batch_tokens=self.config.max_batch_tokens,
            max_cells=self.config.max_cells,
            on_store_change=self.refresh_gauges,
            sweep=self.sweep,
        )

    def record_sweep(self, outcome: SweepOutcome) -> None:
        """A finished sweep in the metrics and the log."""
        self.metrics.sweeps.inc()
        self.metrics.cells.inc(outcome.stats["cells"])
        self.metrics.cells_per_second.set(outcome.stats["cells_per_second"])
        log.info(
            "sweep %s %s: %d cells in %.3f s (%d computed)",
            ",".join(outcome.hooks),
            outcome.metric,
            outcome.stats["cells"],
            outcome.stats["seconds"],
            outcome.stats["computed"],
        )

    def refresh_gauges(self) -> None:
        self.metrics.store_bytes.set(self.store.nbytes())
        self.metrics.store_runs.set(len(self.store.names()))
        self.metrics.queue_depth.set(self.gate.waiting)

    def check_model(self, name: str | None) -> None:
        """A request's ``model``: absent, the served name or the path it was loaded from."""
        if name is None or name in (self.model_name, self.config.model):
            return
        raise NotFound(
            f"the model {name!r} does not exist; this server serves {self.model_name!r}",
            "model",
            kind="model_not_found",
        )
