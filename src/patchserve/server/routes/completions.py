"""OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` with interventions.

Patch entries become runtime edits at absolute positions (positions past the
prompt address generated tokens and apply on the step that computes them),
``steer`` entries additive vectors at every position, ``capture`` a stored
run of the prompt. The generation itself is ``engine.generation``.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import torch
from fastapi import APIRouter, Request

from patchserve.engine import InvalidArgument, capture_run, check_run_name
from patchserve.engine.generation import (
    GenerationRequest,
    GenerationResult,
    SteerVector,
    apply_chat_template,
    generate,
    validate_request,
)
from patchserve.engine.sites import check_site
from patchserve.engine.vectors import mask_vector, table_row, unpack_table
from patchserve.errors import Conflict
from patchserve.models import make_edit
from patchserve.models.hooks import SiteEdit
from patchserve.server.errors import error_responses
from patchserve.server.openai import chat_logprobs, completion_logprobs
from patchserve.server.routes.sources import capture_hooks
from patchserve.server.state import ServerState
from patchserve.wire.completions import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    Usage,
)
from patchserve.wire.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    Interventions,
    PatchEntry,
    SteerEntry,
)

router = APIRouter()


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
    if req.n != 1:
        raise InvalidArgument("only n = 1 is supported", "n")
    if req.stream:
        raise InvalidArgument(
            "streaming completions are not supported; use stream: false", "stream"
        )
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


def _run_one(
    state: ServerState,
    req: Interventions,
    prompt: str,
    ids: list[int],
    *,
    logprobs: int | None,
    echo: bool,
) -> tuple[GenerationResult, str | None]:
    edits, steer = _prepare(state, req)
    gen = GenerationRequest(
        prompt_ids=ids,
        max_tokens=16 if req.max_tokens is None else req.max_tokens,
        temperature=float(req.temperature),
        top_p=float(req.top_p),
        seed=req.seed,
        stop=_stops(req.stop),
        stop_token_ids=[state.tokenizer.eos_token_id]
        if state.tokenizer.eos_token_id is not None
        else [],
        logprobs=logprobs,
        logprob_token_ids=req.logprob_token_ids,
        echo=echo,
        edits=edits,
        steer=steer,
    )
    validate_request(state.model, gen)  # before the capture stores anything
    captured = _capture(state, req, prompt, ids)
    result = state.gated(lambda: generate(state.model, state.tokenizer, gen))
    return result, captured


def _usage(results: list[GenerationResult]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _requested(result: GenerationResult) -> list[dict[str, float]] | None:
    if result.requested_logprobs is None:
        return None
    return [{str(k): v for k, v in step.items()} for step in result.requested_logprobs]


COMPLETION_ERRORS = error_responses(400, 401, 404, 409, 413, 500, 503, 507)


@router.post("/v1/completions", response_model=CompletionResponse, responses=COMPLETION_ERRORS)
async def completions(req: CompletionRequest, request: Request) -> CompletionResponse:
    """OpenAI-compatible completions with patches, steering vectors, captures and exact
    logprobs of chosen ids."""
    state: ServerState = request.app.state.patchserve
    state.check_model(req.model)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise InvalidArgument("prompt is empty", "prompt")
    state.check_prompt_count(len(prompts))
    if req.logprobs is not None and (
        not isinstance(req.logprobs, int) or isinstance(req.logprobs, bool)
    ):
        raise InvalidArgument("logprobs must be an integer (top-k)", "logprobs")
    encoded = [state.encode(p).ids for p in prompts]
    await state.run_blocking(lambda: _prepare(state, req))  # validate before model work

    def work() -> list[tuple[GenerationResult, str | None]]:
        return [
            _run_one(state, req, p, ids, logprobs=req.logprobs, echo=req.echo)
            for p, ids in zip(prompts, encoded, strict=True)
        ]

    results = await state.run_cancellable(request.receive, work)
    tokenizer = state.tokenizer
    choices = [
        CompletionChoice(
            index=index,
            text=result.text,
            logprobs=None
            if result.logprobs is None
            else completion_logprobs(tokenizer, result.logprobs),
            finish_reason=result.finish_reason,
            token_ids=result.token_ids,
            logprob_token_ids=_requested(result),
            captured_source_run=captured,
        )
        for index, (result, captured) in enumerate(results)
    ]
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=state.model_name,
        choices=choices,
        usage=_usage([r for r, _ in results]),
    )


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses=COMPLETION_ERRORS
)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> ChatCompletionResponse:
    """OpenAI-compatible chat completions (the model's chat template) with the same
    interventions."""
    state: ServerState = request.app.state.patchserve
    state.check_model(req.model)
    if not req.messages:
        raise InvalidArgument("messages is empty", "messages")
    ids = apply_chat_template(state.tokenizer, [m.model_dump() for m in req.messages])
    state.check_token_count(len(ids), "messages")
    top = req.top_logprobs if req.logprobs else None
    if req.logprobs and top is None:
        top = 0
    await state.run_blocking(lambda: _prepare(state, req))  # may read a source run
    prompt = state.tokenizer.decode(ids)
    result, captured = await state.run_cancellable(
        request.receive, lambda: _run_one(state, req, prompt, ids, logprobs=top, echo=False)
    )
    choice = ChatChoice(
        index=0,
        message=AssistantMessage(content=result.text),
        logprobs=None
        if result.logprobs is None
        else chat_logprobs(state.tokenizer, result.logprobs),
        finish_reason=result.finish_reason,
        token_ids=result.token_ids,
        logprob_token_ids=_requested(result),
        captured_source_run=captured,
    )
    return ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=state.model_name,
        choices=[choice],
        usage=_usage([result]),
    )
