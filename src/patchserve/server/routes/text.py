"""``/tokenize`` and ``/detokenize``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from patchserve.engine import RequestError
from patchserve.server.schemas import DetokenizeRequest, TokenizeRequest
from patchserve.server.state import ServerState

router = APIRouter()


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    state: ServerState = request.app.state.patchserve
    enc = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {
        "tokens": enc.ids,
        "token_strs": state.tokenizer.token_strings(enc.ids),
        "offsets": [list(o) for o in enc.offsets] if enc.offsets is not None else None,
        "special": enc.special,
        "count": len(enc.ids),
    }


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    state: ServerState = request.app.state.patchserve
    vocab = state.model.cfg.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise RequestError(
            f"token ids {bad[:8]} are outside the vocabulary (0-{vocab - 1})", "tokens"
        )
    return {"prompt": state.tokenizer.decode(req.tokens)}
