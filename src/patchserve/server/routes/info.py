"""``/v1/models``, ``/health``, ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from patchserve.models import Transformer
from patchserve.server.errors import error_responses
from patchserve.server.state import ServerState
from patchserve.wire.info import Health, ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 500))
async def models(request: Request) -> ModelList:
    """The served model: its name and shape (layers, heads, widths, vocabulary)."""
    state: ServerState = request.app.state.patchserve
    cfg = state.model.cfg
    card = ModelCard(
        id=state.model_name,
        created=int(state.started),
        owned_by="patchserve",
        architecture=cfg.architecture,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        dtype=str(state.model.dtype).removeprefix("torch."),
        device=_placement(state.model),
        chat_template=state.tokenizer.has_chat_template,
        runtime="transformers" if state.loaded.runtime == "transformers" else "native",
        hooks=list(state.loaded.hooks),
    )
    return ModelList(data=[card])


@router.get("/health", response_model=Health, responses=error_responses(500))
async def health(request: Request) -> Health:
    """Liveness (open even with --api-key)."""
    state: ServerState = request.app.state.patchserve
    return Health(model=state.model_name)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
        **error_responses(500),
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests, sweeps, cells, stored runs."""
    state: ServerState = request.app.state.patchserve
    state.refresh_gauges()
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _placement(model: Transformer) -> str:
    """The model's device, or its device map's stages (``cuda:0:0-13,cuda:1:14-27``)."""
    if model.device_map is not None:
        return model.device_map.describe()
    return str(model.device)
