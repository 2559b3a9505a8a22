"""Every check of a generation request, before any model work (one place)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from patchserve.engine.errors import InvalidArgument
from patchserve.engine.generation.types import GenerationRequest, SteerVector
from patchserve.engine.sites import check_offered, check_site, is_int
from patchserve.models.hooks import SiteEdit
from patchserve.models.transformer import Transformer

MAX_LOGPROBS = 20


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_ids(ids: Any, vocab: int, param: str) -> None:
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise InvalidArgument(f"{param} must be a list of token ids", param)
    for i in ids:
        if not is_int(i):
            raise InvalidArgument(f"{param} must hold integer token ids, got {i!r}", param)
        if not 0 <= i < vocab:
            raise InvalidArgument(
                f"token id {i} in {param} is outside the vocabulary [0, {vocab})", param
            )


def validate_request(model: Transformer, request: GenerationRequest) -> None:
    """Raise :class:`InvalidArgument` (naming the field) for anything :func:`generate` rejects."""
    cfg = model.cfg
    vocab = cfg.vocab_size
    _check_ids(request.prompt_ids, vocab, "prompt")
    if len(request.prompt_ids) == 0:
        raise InvalidArgument("the prompt is empty: it must hold at least one token", "prompt")
    m = request.max_tokens
    if not is_int(m) or m < 0:
        raise InvalidArgument(f"max_tokens must be an integer >= 0, got {m!r}", "max_tokens")
    context = cfg.max_position_embeddings
    t = len(request.prompt_ids)
    if t > context:
        raise InvalidArgument(
            f"the prompt has {t} tokens, more than the model's context of {context}", "prompt"
        )
    if t + m > context:
        raise InvalidArgument(
            f"the prompt ({t} tokens) plus max_tokens ({m}) exceeds the model's context of "
            f"{context} tokens; lower max_tokens to at most {context - t}",
            "max_tokens",
        )
    temperature = request.temperature
    if not _is_number(temperature) or temperature < 0:
        raise InvalidArgument(
            f"temperature must be a finite number >= 0, got {temperature!r}", "temperature"
        )
    top_p = request.top_p
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {top_p!r}", "top_p")
    if request.seed is not None and not is_int(request.seed):
        raise InvalidArgument(f"seed must be an integer, got {request.seed!r}", "seed")
    k = request.logprobs
    if k is not None and (not is_int(k) or not 0 <= k <= MAX_LOGPROBS):
        raise InvalidArgument(
            f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {k!r}", "logprobs"
        )
    _check_ids(request.logprob_token_ids, vocab, "logprob_token_ids")
    _check_ids(request.stop_token_ids, vocab, "stop_token_ids")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    if not isinstance(stop, Sequence):
        raise InvalidArgument("stop must be a string or a list of strings", "stop")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidArgument(f"stop strings must be non-empty strings, got {s!r}", "stop")
    if not isinstance(request.echo, bool):
        raise InvalidArgument(f"echo must be a boolean, got {request.echo!r}", "echo")
    for edit in request.edits:
        _check_edit(model, edit)
    for steer in request.steer:
        _check_steer(model, steer)


def _check_edit(model: Transformer, edit: SiteEdit) -> None:
    cfg = model.cfg
    heads = [None] if edit.heads is None else edit.heads.tolist()
    for head in heads:  # one site check per patched head
        check_site(cfg, edit.layer, edit.hook, head, "patch")
    check_offered(model, edit.hook, "patch")
    if bool((edit.rows != 0).any()):
        raise InvalidArgument("generation runs one sequence: patch rows must be 0", "patch")
    if bool((edit.positions < 0).any()):
        raise InvalidArgument("patch positions must be >= 0", "patch")
    width = cfg.hook_width(edit.hook)
    if edit.source.dim() != 2 or edit.source.shape[1] != width:
        raise InvalidArgument(
            f"a patch source at {edit.hook} must be {width} wide, got shape "
            f"{list(edit.source.shape)}",
            "patch",
        )
    if edit.heads is not None and bool(((edit.heads < 0) | (edit.heads >= cfg.num_heads)).any()):
        raise InvalidArgument(f"patch heads must be in 0..{cfg.num_heads - 1}", "patch")


def _check_steer(model: Transformer, steer: SteerVector) -> None:
    width = check_site(model.cfg, steer.layer, steer.hook, steer.head, "steer")
    check_offered(model, steer.hook, "steer")
    if not isinstance(steer.vector, torch.Tensor) or tuple(steer.vector.shape) != (width,):
        shape = list(steer.vector.shape) if isinstance(steer.vector, torch.Tensor) else None
        raise InvalidArgument(
            f"a steering vector at {steer.hook} must be {width} wide, got shape {shape}", "steer"
        )
    if not _is_number(steer.scale):
        raise InvalidArgument(
            f"steering scale must be a finite number, got {steer.scale!r}", "steer"
        )
