"""Named vectors: ``/v1/steering/modules``."""

from __future__ import annotations

import numpy as np
import torch
from fastapi import APIRouter, Request

from patchserve.engine.runs import check_name
from patchserve.engine.sites import check_layer, check_offered
from patchserve.errors import InvalidArgument, NotFound
from patchserve.models import INJECTABLE_HOOKS
from patchserve.server.errors import error_responses
from patchserve.server.state import ServerState
from patchserve.wire.info import ModuleDeleted, ModuleList, ModuleRegistered
from patchserve.wire.packing import PackingError, unpack_vectors
from patchserve.wire.requests import PackedVectors, RegisterModuleRequest

router = APIRouter()


@router.post(
    "/v1/steering/modules/register",
    response_model=ModuleRegistered,
    responses=error_responses(400, 401, 409, 413, 500),
)
async def register(req: RegisterModuleRequest, request: Request) -> ModuleRegistered:
    """Register named vectors ``{hook: {layer: vector}}`` for ablation sweeps and steering."""
    state: ServerState = request.app.state.patchserve
    cfg = state.model.cfg
    check_name(req.name, "name", "module")
    if not req.vectors:
        raise InvalidArgument("vectors is empty", "vectors")
    vectors = {}
    for hook, layers in req.vectors.items():
        if hook not in INJECTABLE_HOOKS:
            raise InvalidArgument(f"unknown hook {hook!r}", "vectors")
        check_offered(state.model, hook, "vectors")
        for layer_key, entry in layers.items():
            try:
                layer = int(layer_key)
            except ValueError:
                raise InvalidArgument(f"layer {layer_key!r} is not an integer", "vectors") from None
            check_layer(cfg, layer, "vectors")
            array = _vector_array(entry.vector)
            width = cfg.hook_width(hook)
            if array.shape != (width,):
                raise InvalidArgument(
                    f"{hook}/{layer} vector has {array.size} values; {hook} is {width} wide",
                    "vectors",
                )
            if not np.isfinite(array).all() or not np.isfinite(entry.scale):
                raise InvalidArgument("vectors must be finite", "vectors")
            vectors[hook, layer] = torch.from_numpy(array * float(entry.scale))
    state.modules.register(req.name, vectors, overwrite=req.overwrite)
    return ModuleRegistered(name=req.name, registered=len(vectors))


def _vector_array(vector: PackedVectors | list[float]) -> np.ndarray:
    """One module vector as float32 values, given as a list or packed (one row)."""
    if not isinstance(vector, PackedVectors):
        return np.asarray(vector, dtype=np.float32)
    try:
        array = unpack_vectors(vector.model_dump())
    except PackingError as exc:
        raise InvalidArgument(str(exc), "vectors") from exc
    if array.shape[0] != 1:
        raise InvalidArgument("a packed module vector must have exactly one row", "vectors")
    return array[0]


@router.get("/v1/steering/modules", response_model=ModuleList, responses=error_responses(401, 500))
async def listing(request: Request) -> ModuleList:
    """The registered modules (``zeros`` is built in)."""
    state: ServerState = request.app.state.patchserve
    return ModuleList(data=state.modules.listing())


@router.delete(
    "/v1/steering/modules/{name}",
    response_model=ModuleDeleted,
    responses=error_responses(400, 401, 404, 500),
)
async def drop(name: str, request: Request) -> ModuleDeleted:
    """Delete a registered module."""
    state: ServerState = request.app.state.patchserve
    if not state.modules.drop(name):
        raise NotFound(f"unknown module {name!r}", "name")
    return ModuleDeleted(name=name)
