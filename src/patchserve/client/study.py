"""``AsyncPatchStudy`` (httpx, async) and ``PatchStudy`` (its synchronous facade).

The pattern is httpx's: one class with ``async`` methods, one with the same
methods run synchronously. ``PatchStudy`` owns a private event loop on a
daemon thread and runs every call of an internal :class:`AsyncPatchStudy` there
(``asyncio.run_coroutine_threadsafe``), so it also works inside Jupyter, whose
own loop is already running in the main thread. ``on_cell`` callbacks of a
``PatchStudy`` are therefore called on that private thread.

Example::

    from patchserve import PatchStudy, Span

    with PatchStudy("http://localhost:8000") as study:
        result = study.sweep_layers_positions(
            "The capital of Italy is",
            clean_prompt="The capital of Spain is",
            positions=[Span("Italy"), 7],
            answer_token=" Madrid",
            metric="logprob",
        )
        print(result.top(3))
        result.heatmap()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import math
import os
import sys
import threading
import uuid
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np
from pydantic import ValidationError

from patchserve.client.errors import (
    APIConnectionError,
    APIResponseError,
    NotFoundError,
    PatchServeWarning,
    from_error_body,
    from_response,
)
from patchserve.client.facts import StudyResult, fact_items
from patchserve.client.percell import OnCell, PerCellSweep
from patchserve.client.progress import ProgressBar, in_notebook, with_progress
from patchserve.client.results import CleanRun, SweepResult, ZoomResult
from patchserve.text.spans import Span, incremental_char_offsets, resolve_span
from patchserve.wire.base import WireModel
from patchserve.wire.hooks import HOOKS, LOWER_IS_BETTER, from_transformer_lens, hook_suggestion
from patchserve.wire.info import (
    DetokenizeResponse,
    Health,
    ModelList,
    ModuleRegistered,
    TokenizeResponse,
)
from patchserve.wire.packing import pack_vectors
from patchserve.wire.runs import RunDropped, RunList, RunManifest
from patchserve.wire.sse import aiter_events
from patchserve.wire.study import (
    STUDY_EVENT,
    PatchStudyBody,
    StudyItemEvent,
    StudySummaryEvent,
)
from patchserve.wire.sweep import CellEvent, ErrorEvent, SummaryEvent, SweepBody

T = TypeVar("T")
M = TypeVar("M", bound=WireModel)


DEFAULT_URL = "http://localhost:8000"

Layers = str | Sequence[int] | range | Mapping[str, int] | None
Positions = str | Sequence[int | Span | Mapping[str, Any]] | None
Token = str | int | list[int] | None


def _fresh(prefix: str) -> str:
    """A run name no one else uses (``prefix-<uuid hex>``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _layers_json(layers: Layers) -> Any:
    if layers is None:
        return "all"
    if isinstance(layers, range):
        return list(layers)
    if isinstance(layers, str | Mapping):
        return layers if isinstance(layers, str) else dict(layers)
    return [int(x) for x in layers]


def _positions_json(positions: Positions) -> Any:
    if positions is None:
        return "all_prompt"
    if isinstance(positions, str):
        return positions
    out: list[Any] = []
    for item in positions:
        if isinstance(item, Span):
            out.append(item.to_json())
        elif isinstance(item, Mapping):
            out.append(dict(item))
        else:
            out.append(int(item))
    return out


def _our_hook(name: str) -> str:
    """A hook name; TransformerLens names without a block (``hook_resid_post``,
    ``resid_post``) are mapped, ones with a block say what to write instead."""
    if name in HOOKS:
        return name
    found = from_transformer_lens(name)
    if found is None:
        return name  # the server's 400 lists the hooks
    hook, layer = found
    if layer is not None:
        raise ValueError(hook_suggestion(name))
    return hook


def _names(hooks: str | Sequence[str]) -> list[str]:
    return [hooks] if isinstance(hooks, str) else list(hooks)


def _token_fields(name: str, value: Token) -> dict[str, Any]:
    """``answer_token`` for a string, ``answer_token_id`` for an id or a list of ids (a
    multi-token answer); nothing for None."""
    if value is None:
        return {}
    if isinstance(value, list) or (isinstance(value, int) and not isinstance(value, bool)):
        return {f"{name}_id": value}
    return {name: value}


#: This package's folder: frames in it are the client's own, not the user's.
_CLIENT_DIR = os.path.dirname(__file__) + os.sep
#: Under the synchronous client, the warnings of the call running on the loop thread (which
#: holds no frame of the user's): ``PatchStudy`` raises them in the caller's thread.
_QUEUED_WARNINGS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "patchserve_queued_warnings", default=None
)


def _warn(messages: Sequence[str]) -> None:
    """Each message as a :class:`PatchServeWarning` pointing at the user's line: the first
    frame outside the client (queued instead under the synchronous client)."""
    queued = _QUEUED_WARNINGS.get()
    if queued is not None:
        queued.extend(messages)
        return
    level, frame = 1, sys._getframe(1)  # level 1: the frame that calls _warn
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_CLIENT_DIR):
        level, frame = level + 1, frame.f_back
    for message in messages:
        warnings.warn(message, PatchServeWarning, stacklevel=level + 1)


async def _queueing_warnings(coro: Awaitable[T], queued: list[str]) -> T:
    """Run ``coro`` (in this task's own context) with its warnings queued on ``queued``."""
    _QUEUED_WARNINGS.set(queued)
    return await coro


def _source_name(clean: CleanRun | str | None, run: str | None) -> str | None:
    name = clean.run if isinstance(clean, CleanRun) else clean
    if name is not None and run is not None and name != run:
        raise ValueError(f"clean names run {name!r} but run is {run!r}: give one of them")
    return name if name is not None else run


class AsyncPatchStudy:
    """The async client of a patchserve server.

    ``hook`` is the default hook of sweeps. ``api_key`` (default: the
    ``PATCHSERVE_API_KEY`` environment variable) is sent as a Bearer token.
    ``max_concurrency`` bounds the in-flight completions of a per-cell sweep.
    Use as ``async with AsyncPatchStudy(...) as study:`` or call :meth:`aclose`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        hook: str = "post_block",
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        max_concurrency: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.hook = hook
        self.max_concurrency = max_concurrency
        api_key = api_key if api_key is not None else os.environ.get("PATCHSERVE_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, headers=headers, transport=transport
        )
        self._model_info: dict[str, Any] | None = None

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    async def __aenter__(self) -> AsyncPatchStudy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- transport --------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        expect: type[M],
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> M:
        """One call, its body validated as ``expect``; a typed :class:`PatchServeError` for
        any 4xx/5xx, a broken connection or a body that breaks the wire contract."""
        try:
            response = await self._client.request(method, path, json=json, params=params)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}{path}: {exc}") from exc
        if response.status_code >= 400:
            raise from_response(response)
        try:
            return expect.model_validate_json(response.content)
        except ValidationError as exc:
            raise APIResponseError(
                f"{path} answered {response.status_code} with a body that is not a "
                f"{expect.__name__}: {exc}",
                response.status_code,
                response=response,
            ) from exc

    async def _stream_sweep(self, body: dict[str, Any], on_cell: OnCell) -> SweepBody:
        """``POST /v1/patch_sweep`` with ``stream: true``: every cell event to ``on_cell``."""
        try:
            async with self._client.stream(
                "POST", "/v1/patch_sweep", json={**body, "stream": True}
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise from_response(response)
                async for event in aiter_events(response):
                    if isinstance(event, CellEvent):
                        result = on_cell(event.model_dump(mode="json"))
                        if inspect.isawaitable(result):
                            await result
                    elif isinstance(event, SummaryEvent):
                        return SweepBody.model_validate(event.model_dump(exclude={"type"}))
                    elif isinstance(event, ErrorEvent):
                        raise from_error_body(event.model_dump(mode="json"), 400, response)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the sweep stream from {self.base_url} broke: {exc}") from exc
        except ValidationError as exc:
            raise APIResponseError(
                f"the sweep stream sent an event that breaks the contract: {exc}"
            ) from exc
        raise APIResponseError("the sweep stream ended without a summary event")

    # -- server information and text ----------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return (await self._request("GET", "/health", Health)).model_dump(mode="json")

    async def model_info(self, refresh: bool = False) -> dict[str, Any]:
        """The served model (``GET /v1/models``, first entry): layers, heads, vocab, ..."""
        if self._model_info is None or refresh:
            models = await self._request("GET", "/v1/models", ModelList)
            self._model_info = models.data[0].model_dump(mode="json")
        return self._model_info

    async def tokenize(self, prompt: str, add_special_tokens: bool = True) -> dict[str, Any]:
        """``POST /tokenize``: ``{tokens, token_strs, offsets, special, count}``."""
        body = {"prompt": prompt, "add_special_tokens": add_special_tokens}
        encoded = await self._request("POST", "/tokenize", TokenizeResponse, json=body)
        return encoded.model_dump(mode="json")

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """``POST /detokenize``."""
        body = {"tokens": list(tokens)}
        return (await self._request("POST", "/detokenize", DetokenizeResponse, json=body)).prompt

    async def _encode(self, prompt: str) -> dict[str, Any]:
        """``tokenize`` with character offsets guaranteed (rebuilt by detokenising if absent)."""
        encoded = await self.tokenize(prompt)
        if encoded.get("offsets") is None:
            ids, special = encoded["tokens"], encoded["special"]
            kept = [t for t, s in zip(ids, special, strict=True) if not s]
            texts = await asyncio.gather(
                *(self.detokenize(kept[:n]) for n in range(1, len(kept) + 1))
            )
            by_prefix = {
                tuple(kept[:n]): text
                for n, text in zip(range(1, len(kept) + 1), texts, strict=True)
            }
            encoded["offsets"] = incremental_char_offsets(
                lambda prefix: by_prefix[tuple(prefix)], ids, special
            )
        return encoded

    async def positions_for(self, prompt: str, span: str | Span, occurrence: int = 0) -> list[int]:
        """The token positions of ``prompt`` that the substring ``span`` covers.

        ``occurrence`` picks the n-th match (0-based; a :class:`Span` carries its
        own). Resolved exactly as the server resolves ``{"span": ...}`` positions
        (``patchserve.text.spans``); a missing substring raises ``SpanError``, a
        ``ValueError``.
        """
        marker = span if isinstance(span, Span) else Span(span, occurrence)
        encoded = await self._encode(prompt)
        return resolve_span(prompt, encoded["offsets"], encoded["special"], marker)

    # -- runs -------------------------------------------------------------------------

    async def capture_clean(
        self,
        prompt: str,
        run: str | None = None,
        layers: Layers = None,
        hooks: str | Sequence[str] | Mapping[str, Any] | None = None,
        *,
        positions: str | Sequence[int] = "all_prompt",
        answer_token: Token = None,
        foil_token: Token = None,
        overwrite: bool = False,
    ) -> CleanRun:
        """Store the clean run of ``prompt`` (``POST /v1/patch_source``) and return its handle.

        ``run`` names it (default: a fresh name chosen by the server). ``hooks``
        is a hook name, a list of them or ``{hook: layers}``; ``layers`` applies
        to every listed hook (default: all the model's hooks at all layers). A
        taken name raises :class:`ConflictError` unless ``overwrite``.
        """
        body: dict[str, Any] = {"prompt": prompt, "overwrite": overwrite}
        if run is not None:
            body["run"] = run
        if isinstance(hooks, Mapping):
            body["hooks"] = {h: _layers_json(v) for h, v in hooks.items()}
        elif hooks is not None or layers is not None:
            if not hooks:  # every hook the served model has (its runtime may lack some)
                names = list((await self.model_info()).get("hooks") or HOOKS)
            else:
                names = [hooks] if isinstance(hooks, str) else list(hooks)
            spec = _layers_json(layers)
            if isinstance(spec, dict):  # the capture route takes a list or "all"
                n = (await self.model_info())["num_layers"]
                spec = list(range(spec.get("start", 0), spec.get("stop") or n, spec.get("step", 1)))
            body["hooks"] = {h: spec for h in names}
        if positions != "all_prompt":
            body["positions"] = [int(p) for p in positions]
        body.update(_token_fields("answer_token", answer_token))
        body.update(_token_fields("foil_token", foil_token))
        manifest = await self._request("POST", "/v1/patch_source", RunManifest, json=body)
        return CleanRun.from_manifest(manifest)

    async def get_run(self, run: str | CleanRun) -> CleanRun:
        """The manifest of a stored run (``GET /v1/patch_source/{run}``); 404: NotFoundError."""
        name = run.run if isinstance(run, CleanRun) else run
        return CleanRun.from_manifest(
            await self._request("GET", f"/v1/patch_source/{name}", RunManifest)
        )

    async def list_runs(self) -> list[CleanRun]:
        """Every stored run (``GET /v1/patch_source``)."""
        listing = await self._request("GET", "/v1/patch_source", RunList)
        return [CleanRun.from_manifest(m) for m in listing.data]

    async def drop_run(self, run: str | CleanRun) -> bool:
        """Delete a stored run: True if it was dropped, False if there was none."""
        name = run.run if isinstance(run, CleanRun) else run
        try:
            dropped = await self._request("DELETE", f"/v1/patch_source/{name}", RunDropped)
        except NotFoundError:
            return False
        return dropped.dropped

    async def _run_exists(self, name: str) -> bool:
        try:
            await self.get_run(name)
        except NotFoundError:
            return False
        return True

    async def register_module(
        self, name: str, vectors: Mapping[str, Mapping[int, Any]], overwrite: bool = False
    ) -> dict[str, Any]:
        """Register named vectors ``{hook: {layer: vector}}`` (``ablation_sweep(source=name)``)."""
        packed = {
            hook: {str(layer): {"vector": pack_vectors(v)} for layer, v in per_layer.items()}
            for hook, per_layer in vectors.items()
        }
        registered = await self._request(
            "POST",
            "/v1/steering/modules/register",
            ModuleRegistered,
            json={"name": name, "vectors": packed, "overwrite": overwrite},
        )
        return registered.model_dump(mode="json")

    pack_vectors = staticmethod(pack_vectors)

    # -- sweeps -----------------------------------------------------------------------

    async def _sweep(
        self, body: dict[str, Any], on_cell: OnCell | None, progress: bool | None
    ) -> SweepResult | dict[str, SweepResult]:
        """One server-side sweep; ``{hook: result}`` when the body used ``hooks``."""
        bar = ProgressBar() if (in_notebook() if progress is None else progress) else None
        on_cell = with_progress(on_cell, bar)
        try:
            out = (
                await self._stream_sweep(body, on_cell)
                if on_cell is not None
                else await self._request("POST", "/v1/patch_sweep", SweepBody, json=body)
            )
        finally:
            if bar is not None:
                bar.close()
        _warn(out.warnings)
        if "hooks" in body:
            return SweepResult.per_hook(out)
        return SweepResult.from_body(out)

    async def sweep_layers_positions(
        self,
        corrupt_prompt: str,
        *,
        clean: CleanRun | str | None = None,
        clean_prompt: str | None = None,
        run: str | None = None,
        layers: Layers = "all",
        positions: Positions = "all_prompt",
        answer_token: Token = None,
        foil_token: Token = None,
        metric: str = "logprob",
        alpha: float = 1.0,
        hooks: Sequence[str] | None = None,
        server_side: bool = True,
        on_cell: OnCell | None = None,
        progress: bool | None = None,
        keep_source: bool = False,
        hook: str | None = None,
        heads: Sequence[int] | str | None = None,
        mask: Sequence[int] | Mapping[str, Any] | None = None,
        clean_baseline: float | None = None,
        per_position: bool | None = None,
        method: str = "exact",
        verify_top_k: int | None = None,
    ) -> SweepResult | dict[str, SweepResult]:
        """Patch the clean run into ``corrupt_prompt`` over a layers × positions grid.

        Everything after the prompt is keyword-only (as in the seed's client). The
        source is ``clean`` (a :class:`CleanRun` or a run name), ``run`` (a run
        name) or, with neither, ``clean_prompt``: then the server captures it in
        the same call under a fresh name (``result.auto_captured``,
        ``result.captured_source_run``) and drops it afterwards unless
        ``keep_source``. ``positions`` mixes ints (negative ones count from the
        end) and :class:`Span` markers. ``answer_token``/``foil_token`` are
        strings, ids or lists of ids; several tokens are graded by their
        teacher-forced total log-probability (server-side only).
        ``per_position=False`` with ``hook="attn_head"``: one cell per (layer,
        head), the head patched at every selected position at once (a
        ``[layer][head]`` grid; ``result.top()`` names the heads).

        ``hook`` (default: the study's) returns one :class:`SweepResult`;
        ``hooks`` always returns ``{hook: SweepResult}``, even for one hook.
        Hook names are patchserve's or TransformerLens' (``resid_post``,
        ``hook_resid_post``: mapped; see the README's table).
        ``on_cell(event)`` streams: it gets every ``{"type": "cell", ...}`` event
        as it is graded (it may be a coroutine function). ``progress`` shows a
        ``tqdm`` bar fed by the stream (default: on in a Jupyter notebook).
        The server's ``warnings`` (an improbable answer, identical prompts, ...)
        are raised as :class:`PatchServeWarning`.

        ``method="attribution"`` estimates every cell to first order from one backward
        pass; ``"attribution+verify"`` also computes the ``verify_top_k`` (default 10)
        largest estimated cells exactly, bit for bit the exact sweep's values.
        ``result.exact_mask()`` says which cells are
        exact; ``on_cell`` sees estimates first, then exact values (``event["kind"]``).

        ``server_side=False`` runs the grid from the client instead, one
        ``/v1/completions`` patch request per cell (see
        :mod:`patchserve.client.percell`); it needs a stored run (``clean`` or
        ``run``) and takes one hook.
        """
        source = _source_name(clean, run)
        hook = _our_hook(hook or self.hook)
        hooks = None if hooks is None else [_our_hook(h) for h in _names(hooks)]
        if not server_side:
            if method != "exact":
                raise ValueError("attribution methods are server-side only")
            if hooks is not None:
                raise ValueError(
                    "hooks (several hooks in one call) is a server-side sweep feature; "
                    "call once per hook with server_side=False"
                )
            if (
                per_position is not None
                or isinstance(answer_token, list)
                or isinstance(foil_token, list)
            ):
                raise ValueError(
                    "per_position and multi-token answers (lists of ids) are server-side "
                    "sweep features; the per-cell path grades one token per cell"
                )
            if source is None:
                if clean_prompt is not None:
                    raise ValueError(
                        "the per-cell path needs a captured run: call capture_clean(clean_prompt) "
                        "first and pass clean=... (auto-capture is server-side only)"
                    )
                raise ValueError("give clean (a CleanRun or run name) or run")
            try:
                handle = clean if isinstance(clean, CleanRun) else await self.get_run(source)
            except NotFoundError as exc:
                if clean_prompt is not None:
                    raise ValueError(
                        f"run {source!r} is not captured and the per-cell path does not "
                        "auto-capture: call capture_clean(clean_prompt, run=...) first"
                    ) from exc
                raise
            return await PerCellSweep(
                self,
                corrupt_prompt=corrupt_prompt,
                run=handle,
                hook=hook,
                layers=_layers_json(layers),
                positions=_positions_json(positions),
                heads=heads,
                answer_token=answer_token,
                foil_token=foil_token,
                metric=metric,
                alpha=alpha,
                mask=mask,
                on_cell=on_cell,
                progress=in_notebook() if progress is None else progress,
            ).run_sweep()

        body: dict[str, Any] = {
            "prompt": corrupt_prompt,
            "layers": _layers_json(layers),
            "positions": _positions_json(positions),
            "metric": metric,
            "alpha": alpha,
            "keep_source": keep_source,
        }
        if method != "exact":
            body["method"] = method
        if verify_top_k is not None:
            body["verify_top_k"] = verify_top_k
        if source is None:
            if clean_prompt is None:
                raise ValueError("give clean (a CleanRun or run name), run, or clean_prompt")
            source = _fresh("study")  # a fresh name: the server captures it in this call
        body["source_run"] = source
        if clean_prompt is not None:
            body["clean_prompt"] = clean_prompt
        if hooks is not None:
            body["hooks"] = hooks
        else:
            body["hook"] = hook
        if heads is not None:
            body["heads"] = heads if isinstance(heads, str) else list(heads)
        if per_position is not None:
            body["per_position"] = per_position
        if mask is not None:
            body["mask"] = dict(mask) if isinstance(mask, Mapping) else {"indices": list(mask)}
        if clean_baseline is not None:
            body["clean_baseline"] = clean_baseline
        body.update(_token_fields("answer_token", answer_token))
        body.update(_token_fields("foil_token", foil_token))
        return await self._sweep(body, on_cell, progress)

    async def zoom(
        self,
        corrupt_prompt: str,
        *,
        clean: CleanRun | str | None = None,
        clean_prompt: str | None = None,
        run: str | None = None,
        answer_token: Token = None,
        foil_token: Token = None,
        metric: str = "logprob",
        hook: str | None = None,
        positions: Positions = "all_prompt",
        stride: int | None = None,
        top_positions: int = 3,
        alpha: float = 1.0,
        server_side: bool = True,
        on_cell: OnCell | None = None,
        progress: bool | None = None,
        keep_source: bool = False,
    ) -> ZoomResult:
        """Coarse-to-fine: sweep every ``stride``-th layer, then refine the best block.

        The coarse sweep patches layers ``0, stride, 2*stride, ...`` (each the first
        layer of a block of ``stride`` layers; default stride ≈ √layers) at every
        position of ``positions``. The fine sweep patches all layers of the best
        block at the ``top_positions`` best positions (best: the highest value, the
        lowest for ``kl``). With only ``clean_prompt``, the clean run is captured
        once (at ``hook``, all layers) for both sweeps and dropped afterwards
        unless ``keep_source``.
        """
        hook = _our_hook(hook or self.hook)
        n = (await self.model_info())["num_layers"]
        stride = stride or max(1, round(math.sqrt(n)))
        if stride < 1 or top_positions < 1:
            raise ValueError("stride and top_positions must be >= 1")
        source = _source_name(clean, run)
        temporary = None
        if clean_prompt is not None and (source is None or not await self._run_exists(source)):
            captured = await self.capture_clean(
                clean_prompt, run=source or _fresh("zoom"), hooks=[hook]
            )
            source = captured.run
            temporary = None if keep_source else source
        if source is None:
            raise ValueError("give clean (a CleanRun or run name), run, or clean_prompt")
        common: dict[str, Any] = dict(
            run=source,
            answer_token=answer_token,
            foil_token=foil_token,
            metric=metric,
            alpha=alpha,
            server_side=server_side,
            on_cell=on_cell,
            progress=progress,
            hook=hook,
        )
        try:
            coarse = await self.sweep_layers_positions(
                corrupt_prompt, layers=list(range(0, n, stride)), positions=positions, **common
            )
            assert isinstance(coarse, SweepResult)
            values = coarse.to_numpy()
            if values.ndim == 3:
                values = (
                    np.nanmin(values, axis=2)
                    if metric in LOWER_IS_BETTER
                    else np.nanmax(values, axis=2)
                )
            if np.isnan(values).all():
                raise ValueError("every coarse cell was skipped; nothing to zoom into")
            sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
            scores = np.where(np.isnan(values), -np.inf, sign * values)
            start = coarse.layers[int(np.argmax(scores.max(axis=1)))]
            block = list(range(start, min(start + stride, n)))
            column = scores.max(axis=0)
            order = sorted(range(len(column)), key=lambda j: -column[j])  # stable on ties
            chosen = sorted(
                coarse.positions[j] for j in order[:top_positions] if column[j] > -np.inf
            )
            fine = await self.sweep_layers_positions(
                corrupt_prompt, layers=block, positions=chosen, **common
            )
            assert isinstance(fine, SweepResult)
        finally:
            if temporary is not None:
                await self.drop_run(temporary)
        return ZoomResult(coarse, fine, stride, block, chosen, source)

    async def ablation_sweep(
        self,
        prompt: str,
        *,
        source: str | np.ndarray | Sequence[float] = "zeros",
        mask: Sequence[int] | np.ndarray | Mapping[str, Any] | None = None,
        hook: str | None = None,
        hooks: Sequence[str] | None = None,
        layers: Layers = "all",
        positions: Positions = "all_prompt",
        heads: Sequence[int] | str | None = None,
        answer_token: Token = None,
        foil_token: Token = None,
        metric: str = "logprob",
        alpha: float = 1.0,
        clean_baseline: float | None = None,
        on_cell: OnCell | None = None,
        progress: bool | None = None,
        per_position: bool | None = None,
    ) -> SweepResult | dict[str, SweepResult]:
        """A vector-sourced sweep: write ``source`` into ``prompt`` at every cell.

        Like :meth:`sweep_layers_positions`: keyword-only after the prompt, ``hooks``
        returns ``{hook: SweepResult}``, ``progress`` shows a bar.

        ``source`` is a registered module name (``"zeros"`` is built in) or one
        vector of the hook's width (sent as ``source_inline`` of ``patch_vectors``).
        ``mask`` restricts the write to some dimensions: a list of indices, a
        width-long array of weights in [0, 1] (or booleans), or a raw mask object.
        ``metric="recovered"`` needs ``clean_baseline`` (there is no clean run).
        """
        rows: list[np.ndarray] = []
        body: dict[str, Any] = {
            "prompt": prompt,
            "layers": _layers_json(layers),
            "positions": _positions_json(positions),
            "metric": metric,
            "alpha": alpha,
        }
        if isinstance(source, str):
            body["source_module"] = source
        else:
            rows.append(np.asarray(source, dtype=np.float32).reshape(-1))
            body["source_inline"] = 0
        if isinstance(mask, Mapping):
            body["mask"] = dict(mask)
        elif mask is not None:
            array = np.asarray(mask)
            if array.dtype.kind in "iu":
                body["mask"] = {"indices": [int(i) for i in array.reshape(-1)]}
            else:
                rows.append(array.astype(np.float32).reshape(-1))
                body["mask"] = {"inline": len(rows) - 1}
        if rows:
            if len({r.shape for r in rows}) > 1:
                raise ValueError("the source vector and the mask must have the same width")
            body["patch_vectors"] = pack_vectors(np.stack(rows))
        if hooks is not None:
            body["hooks"] = [_our_hook(h) for h in _names(hooks)]
        else:
            body["hook"] = _our_hook(hook or self.hook)
        if heads is not None:
            body["heads"] = heads if isinstance(heads, str) else list(heads)
        if per_position is not None:
            body["per_position"] = per_position
        if clean_baseline is not None:
            body["clean_baseline"] = clean_baseline
        body.update(_token_fields("answer_token", answer_token))
        body.update(_token_fields("foil_token", foil_token))
        return await self._sweep(body, on_cell, progress)

    # -- causal tracing (ROME) ------------------------------------------------------------

    def _hooks_field(self, hook: str | None, hooks: Sequence[str] | None) -> dict[str, Any]:
        if hooks is not None:
            return {"hooks": [_our_hook(h) for h in _names(hooks)]}
        return {"hook": _our_hook(hook or self.hook)}

    async def trace_fact(
        self,
        prompt: str,
        subject: str | Sequence[int],
        *,
        answer_token: Token = None,
        foil_token: Token = None,
        hook: str | None = None,
        hooks: Sequence[str] | None = None,
        layers: Layers = "all",
        window: int = 1,
        metric: str = "prob",
        samples: int = 10,
        scale: float = 3.0,
        seed: int = 0,
        on_cell: OnCell | None = None,
        progress: bool | None = None,
    ) -> SweepResult | dict[str, SweepResult]:
        """ROME's causal trace of one fact in one call: the clean run of ``prompt`` patched,
        layer by layer and token by token, into copies of it whose ``subject`` (a substring,
        or token positions) has Gaussian noise of ``scale`` × std(embeddings) added to its
        embeddings; every cell is the mean over ``samples`` draws (``result.stderr``: its
        standard error). ``window`` restores that many layers around each cell at once
        (ROME: 10 for ``mlp_out``/``attn_out``). Same ``seed``, same grid, bit for bit."""
        span = subject if isinstance(subject, str) else list(subject)
        noise = {"type": "noise", "span": span, "samples": samples, "scale": scale, "seed": seed}
        body: dict[str, Any] = {
            "prompt": prompt,
            "corruption": noise,
            "layers": _layers_json(layers),
            "window": window,
            "metric": metric,
            **self._hooks_field(hook, hooks),
        }
        body.update(_token_fields("answer_token", answer_token))
        body.update(_token_fields("foil_token", foil_token))
        return await self._sweep(body, on_cell, progress)

    async def trace_facts(
        self,
        facts: Sequence[Mapping[str, Any]],
        *,
        corruption: str = "noise",
        hook: str | None = None,
        hooks: Sequence[str] | None = None,
        layers: Layers = "all",
        window: int = 1,
        metric: str = "prob",
        samples: int = 10,
        scale: float = 3.0,
        seed: int = 0,
        on_item: Callable[[int, SweepResult | dict[str, SweepResult]], Any] | None = None,
    ) -> StudyResult:
        """ROME's study over many facts (``POST /v1/patch_study``): one trace per fact and
        the grids averaged on ROME's token roles (``result.aggregate[hook]``; ``.heatmap()``).

        ``facts``: dicts ``{"clean", "corrupt", "answer", "foil"}`` (as the bundled model's
        ``examples.json``) or ``{"prompt", "subject", "answer"}``. ``corruption="noise"``
        noises each subject (default: the words where clean and corrupt differ);
        ``"replace"`` patches into each corrupt prompt. ``on_item(index, result)`` streams:
        it is called as each fact finishes (it may be a coroutine function)."""
        noise = {"samples": samples, "scale": scale, "seed": seed}
        body: dict[str, Any] = {
            "items": fact_items(facts, corruption, noise),
            "window": window,
            "metric": metric,
            **self._hooks_field(hook, hooks),
        }
        if layers != "all":
            body["layers"] = _layers_json(layers)
        if on_item is None:
            out = await self._request("POST", "/v1/patch_study", PatchStudyBody, json=body)
        else:
            out = await self._stream_study(body, on_item, hooks is not None)
        return StudyResult.from_body(out, hooks is not None)

    async def _stream_study(
        self,
        body: dict[str, Any],
        on_item: Callable[[int, SweepResult | dict[str, SweepResult]], Any],
        hooks_given: bool,
    ) -> PatchStudyBody:
        """``POST /v1/patch_study`` with ``stream: true``: every item to ``on_item``."""
        try:
            async with self._client.stream(
                "POST", "/v1/patch_study", json={**body, "stream": True}
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise from_response(response)
                async for event in aiter_events(response, STUDY_EVENT):
                    if isinstance(event, StudyItemEvent):
                        per = SweepResult.per_hook if hooks_given else SweepResult.from_body
                        result = on_item(event.index, per(event.body))
                        if inspect.isawaitable(result):
                            await result
                    elif isinstance(event, StudySummaryEvent):
                        return PatchStudyBody.model_validate(event.model_dump(exclude={"type"}))
                    elif isinstance(event, ErrorEvent):
                        raise from_error_body(event.model_dump(mode="json"), 400, response)
        except httpx.TransportError as exc:
            raise APIConnectionError(f"the study stream from {self.base_url} broke: {exc}") from exc
        raise APIResponseError("the study stream ended without a summary event")


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Stop a private loop running on ``thread`` and close it."""
    if loop.is_closed():
        return
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    if not thread.is_alive():
        loop.close()


def _sync(method: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """The synchronous twin of an ``AsyncPatchStudy`` method (same name, signature, doc)."""

    @functools.wraps(method)
    def wrapper(self: PatchStudy, *args: Any, **kwargs: Any) -> T:
        return self._call(method(self._async, *args, **kwargs))

    return wrapper


class PatchStudy:
    """The synchronous client: the methods of :class:`AsyncPatchStudy`, blocking.

    Calls run on a private event loop in a daemon thread (so a notebook's own
    running loop is no obstacle); ``on_cell`` callbacks run on that thread. Use
    as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        hook: str = "post_block",
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        max_concurrency: int = 8,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="patchserve-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        # A study that is never closed still stops its loop thread when collected.
        self._finalizer = weakref.finalize(self, _stop_loop, self._loop, self._thread)
        self._async = AsyncPatchStudy(
            base_url, hook, api_key, timeout=timeout, max_concurrency=max_concurrency
        )

    def _call(self, coro: Awaitable[T]) -> T:
        if self._closed:
            raise RuntimeError("this PatchStudy is closed")
        queued: list[str] = []
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            _queueing_warnings(coro, queued), self._loop
        )
        try:
            result = future.result()
        except BaseException:
            future.cancel()  # Ctrl-C: stop the request (a stream is closed, the server cancels)
            raise
        _warn(queued)  # here, in the caller's thread: they point at the caller's line
        return result

    @property
    def base_url(self) -> str:
        return self._async.base_url

    @property
    def hook(self) -> str:
        return self._async.hook

    @hook.setter
    def hook(self, value: str) -> None:
        self._async.hook = value

    def close(self) -> None:
        """Close the connections and stop the private loop."""
        if self._closed:
            return
        self._call(self._async.aclose())
        self._closed = True
        self._finalizer()

    def __enter__(self) -> PatchStudy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    pack_vectors = staticmethod(pack_vectors)

    health = _sync(AsyncPatchStudy.health)
    model_info = _sync(AsyncPatchStudy.model_info)
    tokenize = _sync(AsyncPatchStudy.tokenize)
    detokenize = _sync(AsyncPatchStudy.detokenize)
    positions_for = _sync(AsyncPatchStudy.positions_for)
    capture_clean = _sync(AsyncPatchStudy.capture_clean)
    get_run = _sync(AsyncPatchStudy.get_run)
    list_runs = _sync(AsyncPatchStudy.list_runs)
    drop_run = _sync(AsyncPatchStudy.drop_run)
    register_module = _sync(AsyncPatchStudy.register_module)
    sweep_layers_positions = _sync(AsyncPatchStudy.sweep_layers_positions)
    zoom = _sync(AsyncPatchStudy.zoom)
    ablation_sweep = _sync(AsyncPatchStudy.ablation_sweep)
    trace_fact = _sync(AsyncPatchStudy.trace_fact)
    trace_facts = _sync(AsyncPatchStudy.trace_facts)
