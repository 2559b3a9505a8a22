"""``/v1/patch_source``: capture, list, fetch (with activations) and drop runs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from patchserve.engine import RequestError, capture_run, check_run_name
from patchserve.engine.metrics import raw_score
from patchserve.engine.request import parse_layers, resolve_token
from patchserve.models import INJECTABLE_HOOKS
from patchserve.server.schemas import PatchSourceRequest
from patchserve.server.state import ServerState
from patchserve.wire.packing import pack_vectors

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.patchserve


def capture_hooks(state: ServerState, spec: dict[str, Any] | None) -> dict[str, list[int]]:
    n = state.model.cfg.num_layers
    if spec is None:
        return {hook: list(range(n)) for hook in INJECTABLE_HOOKS}
    if not spec:
        raise RequestError("hooks is empty", "hooks")
    out = {}
    for hook, layers in spec.items():
        if hook not in INJECTABLE_HOOKS:
            raise RequestError(
                f"unknown hook {hook!r}; expected one of {', '.join(INJECTABLE_HOOKS)}", "hooks"
            )
        out[hook] = parse_layers(layers, n, "hooks")
    return out


@router.post("/v1/patch_source")
async def create_source(req: PatchSourceRequest, request: Request):
    state = _state(request)
    name = check_run_name(req.run) if req.run is not None else state.store.fresh_name("run")
    if name in state.store and not req.overwrite:
        raise RequestError(
            f"run {name!r} already exists; pass overwrite: true to replace it", "run", code=409
        )
    encoding = state.encode(req.prompt)
    hooks = capture_hooks(state, req.hooks)
    n_tokens = len(encoding.ids)
    if req.positions == "all_prompt":
        positions = list(range(n_tokens))
    else:
        bad = [p for p in req.positions if not 0 <= p < n_tokens]
        if bad or not req.positions:
            raise RequestError(
                f"positions {bad} are out of range for a prompt of {n_tokens} tokens"
                if bad
                else "positions is empty",
                "positions",
            )
        positions = list(dict.fromkeys(req.positions))
    vocab = state.model.cfg.vocab_size
    answer = resolve_token(
        state.tokenizer, vocab, req.answer_token, req.answer_token_id, "answer_token"
    )
    foil = resolve_token(state.tokenizer, vocab, req.foil_token, req.foil_token_id, "foil_token")
    run = await state.run_blocking(
        lambda: state.gated(
            lambda: capture_run(state.model, name, req.prompt, encoding.ids, hooks, positions)
        )
    )
    run.kept = True
    state.store.put(run, overwrite=req.overwrite)
    state.refresh_gauges()
    body: dict[str, Any] = state.store.manifest(name) or run.manifest()
    assert run.last_logits is not None
    body["top_logprobs"] = state.top_logprobs(run.last_logits, req.logprobs)
    if answer is not None:
        graded: dict[str, Any] = {
            "answer_token_id": answer,
            "logprob": float(raw_score(run.last_logits[None], answer, None)[0]),
        }
        if foil is not None:
            graded["foil_token_id"] = foil
            graded["logit_diff"] = float(raw_score(run.last_logits[None], answer, foil)[0])
        body["graded"] = graded
    return JSONResponse(body)


@router.get("/v1/patch_source")
async def list_sources(request: Request):
    state = _state(request)
    data = [m for name in state.store.names() if (m := state.store.manifest(name)) is not None]
    return {"object": "list", "data": data}


@router.get("/v1/patch_source/{run}")
async def get_source(
    run: str,
    request: Request,
    include: str | None = None,
    hook: str | None = None,
    layer: int | None = None,
):
    state = _state(request)
    check_run_name(run)
    manifest = state.store.manifest(run)
    if manifest is None:
        raise RequestError(f"run {run!r} not found", "run", code=404)
    if include is None:
        return manifest
    if include != "activations":
        raise RequestError("include must be 'activations'", "include")
    if hook is None or layer is None:
        raise RequestError("include=activations needs hook and layer", "hook")
    stored = state.store.get(run)
    assert stored is not None
    acts = stored.activations.get((hook, layer))
    if acts is None:
        raise RequestError(
            f"run {run!r} has no {hook} activations at layer {layer}", "hook", code=404
        )
    flat = acts.float().reshape(acts.shape[0], -1).cpu().numpy()
    manifest["activations"] = {
        **pack_vectors(flat),
        "hook": hook,
        "layer": layer,
        "positions": stored.positions,
    }
    return manifest


@router.delete("/v1/patch_source/{run}")
async def drop_source(run: str, request: Request):
    state = _state(request)
    check_run_name(run)
    if not state.store.drop(run):
        raise RequestError(f"run {run!r} not found", "run", code=404)
    state.refresh_gauges()
    return {"run": run, "object": "patch_source", "dropped": True}
