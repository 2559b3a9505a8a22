"""``/v1/patch_source``: capture, list, fetch (with activations) and drop runs.

Every store call that may touch the disk (save, load, unlink) runs in a worker
thread, so the event loop keeps answering (``/health``) while a large run is
written or read."""

from __future__ import annotations

from typing import Any, Literal

import torch
from fastapi import APIRouter, Request

from patchserve.engine import CapturedRun, InvalidArgument, capture_run, check_run_name
from patchserve.engine.metrics import raw_score
from patchserve.engine.report import top_logprobs
from patchserve.engine.request import resolve_token
from patchserve.engine.sites import check_offered
from patchserve.errors import Conflict, NotFound
from patchserve.models import INJECTABLE_HOOKS
from patchserve.server.errors import error_responses
from patchserve.server.state import ServerState
from patchserve.wire.axes import parse_layers
from patchserve.wire.packing import pack_vectors
from patchserve.wire.requests import HookName, PatchSourceRequest
from patchserve.wire.runs import Graded, RunActivations, RunDropped, RunList, RunManifest

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.patchserve


def capture_hooks(state: ServerState, spec: dict[str, Any] | None) -> dict[str, list[int]]:
    n = state.model.cfg.num_layers
    if spec is None:
        offered = state.model.offered_hooks
        return {hook: list(range(n)) for hook in INJECTABLE_HOOKS if hook in offered}
    if not spec:
        raise InvalidArgument("hooks is empty", "hooks")
    out = {}
    for hook, layers in spec.items():
        if hook not in INJECTABLE_HOOKS:
            raise InvalidArgument(
                f"unknown hook {hook!r}; expected one of {', '.join(INJECTABLE_HOOKS)}", "hooks"
            )
        check_offered(state.model, hook, "hooks")
        out[hook] = parse_layers(layers, n, "hooks")
    return out


@router.post(
    "/v1/patch_source",
    response_model=RunManifest,
    responses=error_responses(400, 401, 404, 409, 413, 500, 503, 507),
)
async def create_source(req: PatchSourceRequest, request: Request) -> RunManifest:
    """Capture and store a clean run; answers its manifest and the clean next-token top-k."""
    state = _state(request)
    state.check_model(req.model)
    name = check_run_name(req.run) if req.run is not None else state.store.fresh_name("run")
    if name in state.store and not req.overwrite:
        raise Conflict(f"run {name!r} already exists; pass overwrite: true to replace it", "run")
    encoding = state.encode(req.prompt)
    hooks = capture_hooks(state, req.hooks)
    positions = _capture_positions(req.positions, len(encoding.ids))
    vocab = state.model.cfg.vocab_size
    answer = resolve_token(
        state.tokenizer, vocab, req.answer_token, req.answer_token_id, "answer_token"
    )
    foil = resolve_token(state.tokenizer, vocab, req.foil_token, req.foil_token_id, "foil_token")

    def capture_and_store() -> tuple[CapturedRun, RunManifest]:
        run = state.gated(
            lambda: capture_run(state.model, name, req.prompt, encoding.ids, hooks, positions)
        )
        run.kept = True
        state.store.put(run, overwrite=req.overwrite)
        return run, state.store.manifest(name) or run.manifest()

    run, manifest = await state.run_blocking(capture_and_store)
    state.refresh_gauges()
    assert run.last_logits is not None
    return manifest.model_copy(
        update={
            "top_logprobs": top_logprobs(state.tokenizer, run.last_logits, req.logprobs),
            "graded": _graded(run.last_logits, answer, foil),
        }
    )


def _capture_positions(requested: list[int] | str, n_tokens: int) -> list[int]:
    """The positions a capture keeps: every one (``all_prompt``) or the requested ones, in
    range and without repeats."""
    if requested == "all_prompt":
        return list(range(n_tokens))
    assert not isinstance(requested, str)
    bad = [p for p in requested if not 0 <= p < n_tokens]
    if bad or not requested:
        raise InvalidArgument(
            f"positions {bad} are out of range for a prompt of {n_tokens} tokens"
            if bad
            else "positions is empty",
            "positions",
        )
    return list(dict.fromkeys(requested))


def _graded(last_logits: torch.Tensor, answer: int | None, foil: int | None) -> Graded | None:
    """The clean run's log-probability of ``answer`` (and logit difference to ``foil``)."""
    if answer is None:
        return None
    logits = last_logits[None]
    return Graded(
        answer_token_id=answer,
        logprob=float(raw_score(logits, answer, None)[0]),
        foil_token_id=foil,
        logit_diff=None if foil is None else float(raw_score(logits, answer, foil)[0]),
    )


@router.get("/v1/patch_source", response_model=RunList, responses=error_responses(401, 500))
async def list_sources(request: Request) -> RunList:
    """Every stored run's manifest."""
    store = _state(request).store
    data = await _state(request).run_blocking(
        lambda: [m for name in store.names() if (m := store.manifest(name)) is not None]
    )
    return RunList(data=data)


@router.get(
    "/v1/patch_source/{run}",
    response_model=RunManifest,
    responses=error_responses(400, 401, 404, 500),
)
async def get_source(
    run: str,
    request: Request,
    include: Literal["activations"] | None = None,
    hook: HookName | None = None,
    layer: int | None = None,
) -> RunManifest:
    """A stored run's manifest; ``?include=activations&hook=..&layer=..`` adds one site's
    activations, packed like ``patch_vectors``."""
    state = _state(request)
    check_run_name(run)
    return await state.run_blocking(lambda: _describe(state, run, include, hook, layer))


def _describe(
    state: ServerState, run: str, include: str | None, hook: str | None, layer: int | None
) -> RunManifest:
    """A run's manifest, with one site's activations when asked (may read the run's file)."""
    manifest = state.store.manifest(run)
    if manifest is None:
        raise NotFound(f"run {run!r} not found", "run")
    if include is None:
        return manifest
    if hook is None or layer is None:
        raise InvalidArgument("include=activations needs hook and layer", "hook")
    stored = state.store.get(run)
    if stored is None:  # dropped since the manifest was read
        raise NotFound(f"run {run!r} not found", "run")
    acts = stored.activations.get((hook, layer))
    if acts is None:
        raise NotFound(f"run {run!r} has no {hook} activations at layer {layer}", "hook")
    flat = acts.float().reshape(acts.shape[0], -1).cpu().numpy()
    packed = pack_vectors(flat)
    activations = RunActivations(
        dtype=packed["dtype"],
        shape=packed["shape"],
        data=packed["data"],
        hook=hook,
        layer=layer,
        positions=stored.positions,
    )
    return manifest.model_copy(update={"activations": activations})


@router.delete(
    "/v1/patch_source/{run}",
    response_model=RunDropped,
    responses=error_responses(400, 401, 404, 500),
)
async def drop_source(run: str, request: Request) -> RunDropped:
    """Delete a stored run (a sweep holding it finishes with what it holds)."""
    state = _state(request)
    check_run_name(run)
    if not await state.run_blocking(lambda: state.store.drop(run)):
        raise NotFound(f"run {run!r} not found", "run")
    state.refresh_gauges()
    return RunDropped(run=run)
