"""A sweep request's ``corruption`` in the service's terms.

``replace`` is today's two-prompt form written the other way round (``prompt``
the clean one): it becomes ``clean_prompt`` + ``prompt``. ``noise`` keeps the
one prompt as both the clean run and the corrupt run's tokens and resolves its
span to token positions (:class:`~patchserve.engine.noise.Noise`). Every
conflicting field is a 400 that says which.
"""

from __future__ import annotations

from typing import Any

from patchserve.engine.errors import InvalidArgument
from patchserve.engine.noise import Noise
from patchserve.engine.study import resolve_positions
from patchserve.text.tokenizer import Encoding, Tokenizer
from patchserve.wire.requests import NoiseCorruption, PatchSweepRequest, ReplaceCorruption

_ONE_SOURCE = ("clean_prompt", "source_run", "source_module", "source_inline")


def _no_other_source(req: PatchSweepRequest, kind: str) -> None:
    for name in _ONE_SOURCE:
        if getattr(req, name) is not None:
            raise InvalidArgument(
                f"corruption {kind!r} makes the corrupt run from `prompt` (the clean prompt); "
                f"{name} has no use with it: drop {name}, or drop corruption for the "
                "two-field form",
                name,
            )


def normalize(req: PatchSweepRequest) -> PatchSweepRequest:
    """The request with ``replace`` unfolded into ``clean_prompt`` + ``prompt`` (else as is);
    ``noise`` becomes ``clean_prompt = prompt`` (the clean run of the same tokens)."""
    corruption = req.corruption
    if corruption is None:
        return req
    _no_other_source(req, corruption.type)
    if isinstance(corruption, ReplaceCorruption):
        return req.model_copy(
            update={"prompt": corruption.prompt, "clean_prompt": req.prompt, "corruption": None}
        )
    return req.model_copy(update={"clean_prompt": req.prompt})


def noise_of(req: PatchSweepRequest, tokenizer: Tokenizer, encoding: Encoding) -> Noise | None:
    """The noise of a ``noise`` corruption, its span resolved on ``encoding`` (the prompt's)."""
    corruption = req.corruption
    if not isinstance(corruption, NoiseCorruption):
        return None
    span = corruption.span
    if isinstance(span, str):
        if not span:
            raise InvalidArgument("corruption.span is empty: give the subject", "corruption.span")
        items: list[Any] = [{"span": span, "occurrence": corruption.occurrence}]
    else:
        items = list(span)
    positions = resolve_positions(tokenizer, req.prompt, encoding, items, "corruption.span")
    return Noise(
        positions=sorted(positions),
        scale=float(corruption.scale),
        samples=corruption.samples,
        seed=corruption.seed,
    )
