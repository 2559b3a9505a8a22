"""``/v1/models``, ``/health``, ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from patchserve.server.state import ServerState

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    state: ServerState = request.app.state.patchserve
    cfg = state.model.cfg
    return {
        "object": "list",
        "data": [
            {
                "id": state.model_name,
                "object": "model",
                "created": int(state.started),
                "owned_by": "patchserve",
                "architecture": cfg.architecture,
                "num_layers": cfg.num_layers,
                "hidden_size": cfg.hidden_size,
                "num_heads": cfg.num_heads,
                "num_kv_heads": cfg.num_kv_heads,
                "head_dim": cfg.head_dim,
                "vocab_size": cfg.vocab_size,
                "dtype": str(state.model.dtype).removeprefix("torch."),
                "device": str(state.model.device),
                "chat_template": state.tokenizer.has_chat_template,
            }
        ],
    }


@router.get("/health")
async def health(request: Request):
    state: ServerState = request.app.state.patchserve
    return {"status": "ok", "model": state.model_name}


@router.get("/metrics")
async def metrics(request: Request):
    state: ServerState = request.app.state.patchserve
    state.refresh_gauges()
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
