"""``/tokenize`` and ``/detokenize``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from patchserve.engine import InvalidArgument
from patchserve.server.errors import error_responses
from patchserve.server.state import ServerState
from patchserve.wire.info import DetokenizeResponse, TokenizeResponse
from patchserve.wire.requests import DetokenizeRequest, TokenizeRequest

router = APIRouter()
ERRORS = error_responses(400, 404, 413, 500)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(req: TokenizeRequest, request: Request) -> TokenizeResponse:
    """Token ids, strings and character offsets of a prompt, as the sweeps see it."""
    state: ServerState = request.app.state.patchserve
    state.check_model(req.model)
    enc = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    state.check_token_count(len(enc.ids), "prompt")
    return TokenizeResponse(
        tokens=enc.ids,
        token_strs=state.tokenizer.token_strings(enc.ids),
        offsets=[[a, b] for a, b in enc.offsets] if enc.offsets is not None else None,
        special=enc.special,
        count=len(enc.ids),
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(req: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """Text of token ids."""
    state: ServerState = request.app.state.patchserve
    state.check_model(req.model)
    state.check_token_count(len(req.tokens), "tokens")
    vocab = state.model.cfg.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidArgument(
            f"token ids {bad[:8]} are outside the vocabulary (0-{vocab - 1})", "tokens"
        )
    return DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens))
