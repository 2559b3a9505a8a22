"""Continuous batching: the rows of every request decode together.

A :class:`GenerationScheduler` serves one model. Requests are **submitted** (each prompt
with its ``n`` samples) and wait for their rows' results; one loop — a worker thread
while there is work (the server), or the caller's own thread (:func:`generate_batch`) —
runs **steps**. Before each step:

1. requests whose caller went away (their cancel scope, :mod:`patchserve.cancel`) or that
   failed leave: their waiting prompts are dropped, their rows leave the batch;
2. the planner (:func:`~.planner.plan_prefill`, pure) admits waiting prompts under the
   token budget and groups them by length into **prefill passes**, each run as its own
   pass that writes the prompts' keys into spare rows of the one block
   (:class:`~.blockrows.BlockRows`; a prompt's other samples get a copy of its row); each
   new row samples its first token from its prefill's logits;

then one **decoding pass** feeds every running row its last token at its own position
(rows of different requests and lengths side by side), each row samples, stops and reports
(:class:`~.batch._Row`: its own generator, so a seeded row draws the same tokens whatever
shares the batch), and the rows that ended leave. Every pass takes the ``gate`` (the
server's fair gate), so other work runs between passes. A row's interventions are
addressed to its row of each pass (:func:`~.batch.merge_edits`): one request's patches
and vectors never touch another's rows.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from patchserve.cancel import cancel_scope, cancelled
from patchserve.engine.generation.batch import (
    BlockExecutor,
    Listener,
    _Row,
    merge_edits,
    one_at_a_time,
)
from patchserve.engine.generation.blockrows import BlockRows
from patchserve.engine.generation.interventions import Interventions
from patchserve.engine.generation.loop import _Completion, _generator
from patchserve.engine.generation.planner import (
    MAX_ROWS,
    PREFILL_BUDGET,
    Waiting,
    compact_moves,
    plan_prefill,
)
from patchserve.engine.generation.sampling import report_prompt_steps
from patchserve.engine.generation.types import GenerationRequest, GenerationResult, TokenStep
from patchserve.engine.generation.validation import validate_request
from patchserve.errors import Cancelled
from patchserve.models.transformer import Transformer
from patchserve.text.tokenizer import Tokenizer


class Ticket:
    """One submission: its rows' results once every row has ended, or what stopped it."""

    def __init__(self, rows: int, listener: Listener | None) -> None:
        self.listener = listener
        self.rows: list[_Row | None] = [None] * rows
        self.left = rows
        self.error: BaseException | None = None
        self.done = threading.Event()
        context = contextvars.copy_context()  # the submitter's cancel scope
        self.cancelled: Callable[[], bool] = lambda: context.run(cancelled)

    def left_us(self) -> bool:
        """Whether the submission failed or its caller went away."""
        return self.error is not None or self.cancelled()

    def ended(self, row: _Row) -> None:
        self.rows[row.index] = row
        self.left -= 1
        if self.left == 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()

    def wait(self) -> list[GenerationResult]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return [row.result() for row in self.rows if row is not None]


@dataclass
class _Prompt:
    """A prompt waiting to join, with its ``n`` samples (choices ``first ..``)."""

    ticket: Ticket
    request: GenerationRequest
    ids: list[int]
    hooks: Interventions
    first: int
    n: int
    steps: list[TokenStep | None] = field(default_factory=list)  # echoed prompt logprobs


@dataclass
class _Seat:
    """A running row and the submission it answers."""

    row: _Row
    ticket: Ticket


class GenerationScheduler:
    """Continuous batching on one model (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        gate: Callable[[], AbstractContextManager[Any]] | None = None,
        budget: int = PREFILL_BUDGET,
        max_rows: int = MAX_ROWS,
        threaded: bool = True,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.executor = BlockExecutor(model, gate or nullcontext)
        self.budget, self.max_rows, self.threaded = budget, max_rows, threaded
        self.block = BlockRows(model.cfg.num_layers, max_rows)
        self.active: list[_Seat] = []  # block row i holds active[i]
        self.waiting: list[_Prompt] = []
        self.steps = 0  # decoding passes run (for /metrics)
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    @property
    def running(self) -> int:
        """Rows decoding now."""
        return len(self.active)

    def run(
        self, requests: Sequence[GenerationRequest], n: int = 1, listener: Listener | None = None
    ) -> list[GenerationResult]:
        """Generate ``n`` completions of every request (prompt-major), blocking until done."""
        ticket = self.submit(requests, n, listener)
        if not self.threaded:
            with torch.inference_mode():
                while self.step():
                    pass
        return ticket.wait()

    def submit(
        self, requests: Sequence[GenerationRequest], n: int = 1, listener: Listener | None = None
    ) -> Ticket:
        """Queue the requests' prompts (validated first); their rows join at the next step."""
        for request in requests:
            validate_request(self.model, request)
        ticket = Ticket(len(requests) * n, listener)
        if not requests:
            ticket.done.set()
            return ticket
        device = self.model.device
        prompts = []
        for r, request in enumerate(requests):
            ids = [int(i) for i in request.prompt_ids]
            hooks = Interventions(request, len(ids), device)
            prompts.append(_Prompt(ticket, request, ids, hooks, r * n, n))
        with self._lock:
            self.waiting.extend(prompts)
            if self.threaded and self._worker is None:
                self._worker = threading.Thread(
                    target=self._work, name="patchserve-generation", daemon=True
                )
                self._worker.start()
        return ticket

    def _work(self) -> None:
        """The worker thread: steps while there is work, then ends."""
        with torch.inference_mode():
            while True:
                try:
                    self.step()
                except BaseException as exc:  # a bug: no submitter may wait forever
                    self._fail_all(exc)
                with self._lock:
                    if not (self.waiting or self.active):
                        self._worker = None
                        return

    def step(self) -> bool:
        """Drop the leavers, prefill the joiners, run one decoding pass; True while rows
        run or prompts wait."""
        self._drop_leavers()
        with self._lock:
            waiting = list(self.waiting)
        queue = [Waiting(i, len(p.ids), p.n) for i, p in enumerate(waiting)]
        passes = plan_prefill(queue, len(self.active), self.budget, self.max_rows)
        joining = {id(waiting[w.key]) for group in passes for w in group}
        with self._lock:
            self.waiting = [p for p in self.waiting if id(p) not in joining]
        for group in passes:
            prompts = [waiting[w.key] for w in group]
            if any(not p.ticket.left_us() for p in prompts):
                self._prefill([p for p in prompts if not p.ticket.left_us()])
            for p in prompts:
                if p.ticket.left_us():
                    p.ticket.fail(Cancelled("the caller went away; its rows were stopped"))
        self._drop_leavers()
        if self.active:
            self._decode()
        with self._lock:
            return bool(self.waiting or self.active)

    def _drop_leavers(self) -> None:
        tickets = {id(s.ticket): s.ticket for s in self.active}
        with self._lock:
            tickets.update((id(p.ticket), p.ticket) for p in self.waiting)
        gone = {key for key, t in tickets.items() if t.left_us()}
        if not gone:
            return
        for key in gone:
            tickets[key].fail(Cancelled("the caller went away; its rows were stopped"))
        with self._lock:
            self.waiting = [p for p in self.waiting if id(p.ticket) not in gone]
        self._leave([i for i, s in enumerate(self.active) if id(s.ticket) in gone])

    def _prefill(self, prompts: list[_Prompt]) -> None:
        """One prefill pass: the prompts' keys into spare rows, their rows' first tokens."""
        start, k = self.block.used, len(prompts)
        rows = sum(p.n for p in prompts)
        self.block.reserve(start + rows, max(len(p.ids) + p.request.max_tokens for p in prompts))
        view = self.block.view(start, k)
        edits = merge_edits(p.hooks.edits(0, len(p.ids), r) for r, p in enumerate(prompts))
        tickets = {p.ticket for p in prompts}
        try:
            with cancel_scope(lambda: all(t.left_us() for t in tickets)):
                logits, hidden = self.executor.prefill(view, [p.ids for p in prompts], edits)
        except Exception as exc:
            for p in prompts:
                p.ticket.fail(exc)
            return
        self.block.adopt(view, start)
        source = [r for r, p in enumerate(prompts) for _ in range(p.n - 1)]  # other samples
        self.block.move(list(range(start + k, start + rows)), [start + r for r in source])
        self.block.used = start + rows
        seats = [self._seat(p, hidden[r : r + 1, : len(p.ids)], 0) for r, p in enumerate(prompts)]
        seats += [self._seat(prompts[r], None, j) for r, j in _samples(prompts)]
        self.active.extend(seats)
        cpu = logits.float().cpu()
        first = list(range(k)) + source
        ended = [start + i for i, s in enumerate(seats) if self._post(s, cpu[first[i]])]
        self._leave(ended)

    def _seat(self, prompt: _Prompt, hidden: torch.Tensor | None, j: int) -> _Seat:
        """Sample ``j`` of ``prompt``'s row (``hidden``: its prefill, for echoed logprobs)."""
        request, k = prompt.request, prompt.request.logprobs
        steps: list[TokenStep | None] = []
        if request.echo and k is not None:
            steps = (
                prompt.steps
                if hidden is None
                else report_prompt_steps(self.model, hidden, prompt.ids, k)
            )
            prompt.steps = steps
        seed = None if request.seed is None else request.seed + j
        row = _Row(
            prompt.first + j,
            request,
            prompt.ids,
            prompt.hooks,
            _Completion.start(self.tokenizer, prompt.ids, request),
            _generator(seed),
            [int(i) for i in request.logprob_token_ids],
            steps,
        )
        return _Seat(row, prompt.ticket)

    def _decode(self) -> None:
        """One decoding pass over every running row; the rows that ended leave."""
        rows = [s.row for s in self.active]
        edits = merge_edits(row.hooks.edits(row.position, 1, i) for i, row in enumerate(rows))
        view = self.block.view(0, len(rows))
        tickets = {seat.ticket for seat in self.active}
        try:  # stops mid-pass (between blocks) once every caller of the batch went away
            with cancel_scope(lambda: all(t.left_us() for t in tickets)):
                logits = self.executor.step(
                    view, [row.token for row in rows], [row.position for row in rows], edits
                )
        except Exception as exc:
            for ticket in tickets:
                ticket.fail(exc)
            self.active = []
            self.block.release()
            return
        self.steps += 1
        cpu = logits.float().cpu()
        self._leave([i for i, seat in enumerate(self.active) if self._post(seat, cpu[i])])

    def _post(self, seat: _Seat, logits: torch.Tensor) -> bool:
        """Sample, stop and tell the row's listener; True when the row leaves."""
        row, ticket = seat.row, seat.ticket
        if ticket.done.is_set():
            return True
        try:
            ended = row.request.max_tokens == 0 or row.accept(logits)
            if ticket.listener is not None:
                row.release(ticket.listener, ended)
        except Exception as exc:  # a listener's failure ends its own request only
            ticket.fail(exc)
            return True
        if ended:
            ticket.ended(row)
        return ended

    def _leave(self, rows: list[int]) -> None:
        """The rows ``rows`` (block rows) leave; the rows past the new end close the gaps."""
        if not rows:
            return
        moves = compact_moves(len(self.active), rows)
        self.block.move([to for to, _ in moves], [source for _, source in moves])
        for to, source in moves:
            self.active[to] = self.active[source]
        del self.active[len(self.active) - len(rows) :]
        self.block.used = len(self.active)
        if not self.active:
            self.block.release()

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            prompts, self.waiting = self.waiting, []
        for p in prompts:
            p.ticket.fail(error)
        for seat in self.active:
            seat.ticket.fail(error)
        self.active = []
        self.block.release()


def _samples(prompts: list[_Prompt]) -> list[tuple[int, int]]:
    """``(prompt, sample)`` of the rows past each prompt's first, in block order."""
    return [(r, j) for r, p in enumerate(prompts) for j in range(1, p.n)]


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    tokenizer: Tokenizer,
    requests: Sequence[GenerationRequest],
    n: int = 1,
    listener: Listener | None = None,
    gate: Callable[[], AbstractContextManager[Any]] | None = None,
) -> list[GenerationResult]:
    """Generate ``n`` completions of every request together, in the caller's thread; results
    prompt-major (``n`` samples of request 0, then of request 1, ...). ``listener`` hears
    the text as it comes (a stream); ``gate`` is entered around every pass."""
    for request in requests:
        validate_request(model, request)
    if not requests:
        return []
    if model.runtime != "native":  # the transformers runtime has no key/value block
        return one_at_a_time(model, tokenizer, requests, n, listener, gate or nullcontext)
    return GenerationScheduler(model, tokenizer, gate, threaded=False).run(requests, n, listener)
