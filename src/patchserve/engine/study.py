"""From a study's plain inputs (prompts, strings, spans) to a validated :class:`SweepSpec`.

Everything a request can get wrong is checked here, before any model work:
hooks, layers, heads, positions and spans, the source run's coverage,
masks, alpha, answer and foil tokens. The server, the command line and the
in-process API all go through :func:`prepare_sweep`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from patchserve.engine.attribution import check_method, check_method_scope
from patchserve.engine.continuation import Continuation, check_multi_token_metric
from patchserve.engine.diagnostics import span_warnings
from patchserve.engine.errors import InvalidArgument
from patchserve.engine.metrics import check_metric
from patchserve.engine.request import resolve_tokens
from patchserve.engine.runs import CapturedRun
from patchserve.engine.sites import check_context, check_offered
from patchserve.engine.sweep import (
    DEFAULT_BATCH_TOKENS,
    Source,
    SweepSpec,
    VectorSource,
    window_layers,
)
from patchserve.models import Transformer
from patchserve.text.alignment import Alignment, align
from patchserve.text.spans import SpanError, expand_positions, incremental_char_offsets
from patchserve.text.tokenizer import Encoding, Tokenizer
from patchserve.wire.axes import parse_heads, parse_hooks, parse_layers


def char_offsets(tokenizer: Tokenizer, encoding: Encoding) -> list[tuple[int, int]]:
    if encoding.offsets is not None:
        return [
            (a, b) if not s else (a, a)
            for (a, b), s in zip(encoding.offsets, encoding.special, strict=True)
        ]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return incremental_char_offsets(decode, encoding.ids, encoding.special)


def resolve_positions(
    tokenizer: Tokenizer, prompt: str, encoding: Encoding, spec: Any, param: str = "positions"
) -> list[int]:
    if spec is None or spec == "all_prompt":
        return list(range(len(encoding.ids)))
    if isinstance(spec, str) or not isinstance(spec, Sequence):
        raise InvalidArgument("positions must be 'all_prompt' or a list of ints and spans", param)
    if not spec:
        raise InvalidArgument("positions is empty", param)
    try:
        return expand_positions(spec, prompt, char_offsets(tokenizer, encoding), encoding.special)
    except SpanError as exc:
        raise InvalidArgument(str(exc), param) from exc


def _check_masks(
    masks: dict[str, torch.Tensor] | torch.Tensor | None, hooks: list[str], model: Transformer
) -> dict[str, torch.Tensor] | None:
    if masks is None:
        return None
    if isinstance(masks, torch.Tensor):
        masks = dict.fromkeys(hooks, masks)
    out = {}
    for hook in hooks:
        mask = masks.get(hook)
        if mask is None:
            continue
        width = model.cfg.hook_width(hook)
        if mask.shape != (width,):
            raise InvalidArgument(
                f"mask has {mask.numel()} values; hook {hook} is {width} wide", "mask"
            )
        if not bool(((mask >= 0) & (mask <= 1)).all()):
            raise InvalidArgument("mask values must lie in [0, 1]", "mask")
        out[hook] = mask.float().to(model.device)
    return out


def _check_layers(run: CapturedRun, hooks: list[str], layers: list[int]) -> None:
    captured = run.hook_layers()
    for hook in hooks:
        missing = [layer for layer in layers if layer not in captured.get(hook, [])]
        if missing:
            raise InvalidArgument(
                f"source run {run.name!r} did not capture {hook} at layer(s) {missing}",
                "source_run",
            )


def _check_run(
    run: CapturedRun,
    hooks: list[str],
    layers: list[int],
    positions: list[int],
    corrupt_ids: list[int],
) -> None:
    _check_layers(run, hooks, layers)
    alignment = _check_alignable(run.token_ids, corrupt_ids, positions)
    for p in positions:
        src = alignment.source_position(p)
        if src is not None and src not in run.positions:
            raise InvalidArgument(
                f"source run {run.name!r} did not capture position {src} (paired with "
                f"corrupt position {p})",
                "source_run",
            )


def _check_alignable(
    clean_ids: list[int], corrupt_ids: list[int], positions: list[int]
) -> Alignment:
    """The alignment, if at least one requested position has a clean partner (as the seed)."""
    alignment = align(clean_ids, corrupt_ids)
    if all(alignment.source_position(p) is None for p in positions):
        raise InvalidArgument(
            "no alignable positions: the clean and corrupt prompts share no common token "
            f"prefix or suffix at the requested positions {positions} (the differing middle "
            f"is {alignment.unpaired()})",
            "positions",
        )
    return alignment


def _encode_prompt(tokenizer: Tokenizer, prompt: str) -> Encoding:
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgument("prompt must be a non-empty string", "prompt")
    encoding = tokenizer.encode(prompt)
    if not encoding.ids:
        raise InvalidArgument("prompt tokenizes to no tokens", "prompt")
    return encoding


def _check_numbers(alpha: float, clean_baseline: float | None) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidArgument("alpha must be a finite number", "alpha")
    if clean_baseline is not None and not math.isfinite(clean_baseline):
        raise InvalidArgument("clean_baseline must be a finite number", "clean_baseline")


def _answer_and_foil(
    tokenizer: Tokenizer,
    vocab: int,
    answer_token: str | None,
    answer_token_id: int | list[int] | None,
    foil_token: str | None,
    foil_token_id: int | list[int] | None,
    notes: list[str],
) -> tuple[list[int] | None, list[int] | None]:
    """The graded token sequences (one token or a continuation each); ``notes`` gets the
    warnings about their spelling."""
    answer = resolve_tokens(tokenizer, vocab, answer_token, answer_token_id, "answer_token", notes)
    foil = resolve_tokens(tokenizer, vocab, foil_token, foil_token_id, "foil_token", notes)
    if answer is not None and foil is not None and answer == foil:
        raise InvalidArgument("answer and foil are the same token(s)", "foil_token")
    return answer, foil


class _Cells(NamedTuple):
    """The sweep's axes and the corrupt prompt's ids, once parsed."""

    hooks: list[str]
    layers: list[int]
    positions: list[int]
    corrupt_ids: list[int]


def _check_source(
    source: Source | None,
    cells: _Cells,
    metric: str,
    clean_baseline: float | None,
    clean_ids: list[int] | None,
) -> None:
    """A stored run covers the cells (and has logits for ``kl``); a run about to be
    captured aligns; a vector source brings its clean baseline for ``recovered``."""
    if isinstance(source, CapturedRun):
        _check_run(source, cells.hooks, cells.layers, cells.positions, cells.corrupt_ids)
        if metric == "kl" and source.last_logits is None:
            raise InvalidArgument("metric 'kl' needs a source run captured with logits", "metric")
    elif source is None and clean_ids is not None:
        _check_alignable(clean_ids, cells.corrupt_ids, cells.positions)
    elif source is not None and metric == "recovered" and clean_baseline is None:
        raise InvalidArgument(
            "metric 'recovered' on a vector-sourced sweep needs clean_baseline", "clean_baseline"
        )


def _check_per_position(per_position: bool | None, hooks: list[str]) -> None:
    if per_position is None:
        return
    if not isinstance(per_position, bool):
        raise InvalidArgument("per_position must be true or false", "per_position")
    if "attn_head" not in hooks:
        raise InvalidArgument(
            "per_position applies to the attn_head hook only (false: one cell per (layer, "
            f"head), patched at every selected position at once); the sweep's hooks are {hooks}",
            "per_position",
        )


def prepare_sweep(
    model: Transformer,
    tokenizer: Tokenizer,
    *,
    prompt: str,
    source: Source | None,
    hook: str | None = None,
    hooks: list[str] | None = None,
    layers: Any = "all",
    positions: Any = "all_prompt",
    heads: Any = None,
    alpha: float = 1.0,
    masks: dict[str, torch.Tensor] | torch.Tensor | None = None,
    answer_token: str | None = None,
    answer_token_id: int | list[int] | None = None,
    foil_token: str | None = None,
    foil_token_id: int | list[int] | None = None,
    metric: str = "logprob",
    per_position: bool | None = None,
    clean_baseline: float | None = None,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    max_cells: int | None = None,
    clean_ids: list[int] | None = None,
    window: int = 1,
    method: str = "exact",
    verify_top_k: int | None = None,
) -> tuple[SweepSpec, list[str]]:
    """A validated sweep and the corrupt prompt's token strings (axis labels).

    ``source=None`` validates everything but the source (a caller about to
    capture a run that covers the sweep by construction) and leaves
    ``spec.source`` for the caller to set; ``clean_ids`` (the prompt it will
    capture) is then checked for alignable positions.
    """
    cfg = model.cfg
    encoding = _encode_prompt(tokenizer, prompt)
    check_context(cfg, len(encoding.ids), "prompt")
    if clean_ids is not None:
        check_context(cfg, len(clean_ids), "clean_prompt")
    hook_list = parse_hooks(hook, hooks)
    for name in hook_list:
        check_offered(model, name, "hooks" if hooks is not None else "hook")
    layer_list = parse_layers(layers, cfg.num_layers)
    position_list = resolve_positions(tokenizer, prompt, encoding, positions)
    head_list = _heads(heads, hook_list, cfg.num_heads)
    check_metric(metric)
    _check_numbers(alpha, clean_baseline)
    _check_per_position(per_position, hook_list)
    notes = span_warnings(prompt, positions)
    answer, foil = _answer_and_foil(
        tokenizer, cfg.vocab_size, answer_token, answer_token_id, foil_token, foil_token_id, notes
    )
    check_multi_token_metric(metric, Continuation.plan(answer or [0], foil))
    cells = _Cells(hook_list, layer_list, position_list, encoding.ids)
    _check_source(source, cells, metric, clean_baseline, clean_ids)
    _check_window(window, source, hook_list, layer_list, cfg.num_layers)
    check_method_scope(
        method,
        answer_tokens=max(len(answer or []), len(foil or [])),
        window=window,
        per_position=per_position is not False,
    )
    if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise InvalidArgument("max_batch_tokens must be a positive integer", "max_batch_tokens")
    spec = SweepSpec(
        corrupt_ids=encoding.ids,
        hooks=hook_list,
        layers=layer_list,
        positions=position_list,
        source=source,
        metric=metric,
        answer=None if answer is None else answer[0],
        foil=None if foil is None else foil[0],
        answer_ids=answer,
        foil_ids=foil,
        per_position=per_position is not False,
        heads=head_list,
        alpha=float(alpha),
        masks=_check_masks(masks, hook_list, model),
        clean_baseline=clean_baseline,
        max_batch_tokens=max_batch_tokens,
        warnings=notes,
        window=window,
        method=method,
        verify_top_k=check_method(method, verify_top_k),
    )
    _check_size(spec, max_cells)
    return spec, tokenizer.token_strings(encoding.ids)


def _heads(heads: Any, hooks: list[str], num_heads: int) -> list[int] | None:
    head_list = parse_heads(heads, num_heads) if "attn_head" in hooks else None
    if heads is not None and head_list is None:
        raise InvalidArgument("heads apply to the attn_head hook only", "heads")
    return head_list


def _check_window(
    window: int, source: Source | None, hooks: list[str], layers: list[int], num_layers: int
) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InvalidArgument(f"window must be an integer >= 1, got {window!r}", "window")
    if isinstance(source, CapturedRun) and window > 1:
        _check_layers(source, hooks, window_span(layers, window, num_layers))


def _check_size(spec: SweepSpec, max_cells: int | None) -> None:
    if max_cells is not None and spec.num_cells > max_cells:
        raise InvalidArgument(
            f"the sweep has {spec.num_cells} cells; this server allows at most {max_cells}",
            "layers",
        )


def window_span(layers: list[int], window: int, num_layers: int) -> list[int]:
    """Every layer some cell's window restores (what the source run must cover)."""
    return sorted({w for layer in layers for w in window_layers(layer, window, num_layers)})


def zeros_source(model: Transformer) -> VectorSource:
    cfg, device, dtype = model.cfg, model.device, model.dtype
    return VectorSource(
        "zeros", lambda hook, layer: torch.zeros(cfg.hook_width(hook), device=device, dtype=dtype)
    )
