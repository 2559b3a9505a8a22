"""Result objects of the client: :class:`CleanRun`, :class:`SweepResult`, :class:`ZoomResult`.

A :class:`SweepResult` holds every field of a ``POST /v1/patch_sweep`` response
(docs/api.md §2) for one hook, plus the helpers a notebook wants: ``to_numpy()``,
``argmax_cell()``, ``top(k)``, ``heatmap()`` (matplotlib, imported on use) and
``to_pandas()`` (pandas, imported on use). Results of the client-side per-cell
path (``server_side=False``) have the same shape, with ``server_side=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from patchserve.wire.hooks import LOWER_IS_BETTER
from patchserve.wire.runs import RunManifest
from patchserve.wire.sweep import SweepBody

if TYPE_CHECKING:
    from matplotlib.axes import Axes


@dataclass
class CleanRun:
    """A handle on a stored clean run: its name, prompt and token ids (plus its manifest)."""

    run: str
    prompt: str
    token_ids: list[int]
    hooks: dict[str, list[int]] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    kept: bool = True
    top_logprobs: list[dict[str, Any]] | None = field(default=None, repr=False)
    graded: dict[str, Any] | None = None
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The run name (alias of ``run``)."""
        return self.run

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_manifest(cls, body: RunManifest | dict[str, Any]) -> CleanRun:
        """From a ``/v1/patch_source`` manifest (or the capture response, which extends it),
        validated against the wire's ``RunManifest``."""
        parsed = body if isinstance(body, RunManifest) else RunManifest.model_validate(body)
        raw = parsed.model_dump(mode="json")
        return cls(
            run=parsed.run,
            prompt=parsed.prompt,
            token_ids=parsed.token_ids,
            hooks=dict(parsed.hooks),
            positions=parsed.positions,
            kept=parsed.kept,
            top_logprobs=raw.get("top_logprobs"),
            graded=raw.get("graded"),
            manifest=raw,
        )


def token_label(position: int, tokens: list[str]) -> str:
    """An axis label for a position: ``"3 ' Mary'"`` (repr shows leading spaces)."""
    if 0 <= position < len(tokens):
        return f"{position} {tokens[position]!r}"
    return str(position)


@dataclass
class SweepResult:
    """One hook's grid of a patching sweep, with every field of the response.

    ``grid[i][j]`` is the metric with layer ``layers[i]`` patched at position
    ``positions[j]`` (``attn_head``: ``grid[i][j][k]`` for ``heads[k]``; a head
    sweep that is not ``per_position``: ``grid[i][k]``, the head patched at every
    position at once);
    ``None`` marks a skipped cell (see ``skipped``). ``raw`` is the whole
    response body.
    """

    hook: str
    layers: list[int]
    positions: list[int]
    metric: str
    grid: list[Any]
    clean: float | None = None
    corrupt: float | None = None
    argmax: dict[str, Any] | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    alignment: dict[str, Any] | None = None
    noise_floor: float | None = None
    auto_captured: bool = False
    captured_source_run: str | None = None
    source_run: str | None = None
    heads: list[int] | None = None
    tokens: list[str] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict, repr=False)
    answer_token_id: int | None = None
    answer_token: str | None = None
    foil_token_id: int | None = None
    foil_token: str | None = None
    answer_token_ids: list[int] = field(default_factory=list)
    foil_token_ids: list[int] | None = None
    per_position: bool = True
    hooks: list[str] = field(default_factory=list)
    model: str | None = None
    warnings: list[str] = field(default_factory=list)
    server_side: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    window: int = 1
    stderr: list[Any] | None = None  # noise: standard error of each cell's mean
    noise: dict[str, Any] | None = None  # noise: positions, scale, sigma, samples, seed
    method: str = "exact"
    kinds: list[Any] | None = None  # "exact" / "estimate" per cell (attribution methods)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_body(
        cls, body: SweepBody | dict[str, Any], hook: str | None = None, *, server_side: bool = True
    ) -> SweepResult:
        """The result for ``hook`` (default: the top-level one) of a sweep response body.

        A dict is validated against the wire's ``SweepBody`` first: a body that does
        not match the contract raises ``pydantic.ValidationError``, never a half-read
        result.
        """
        parsed = body if isinstance(body, SweepBody) else SweepBody.model_validate(body)
        hook = hook or parsed.hook
        grid, argmax, stderr = parsed.grid, parsed.argmax, parsed.stderr_grid
        if hook != parsed.hook or parsed.hook_grids:
            entry = next((g for g in parsed.hook_grids or [] if g.hook == hook), None)
            if entry is None:
                raise KeyError(f"the response has no grid for hook {hook!r}")
            grid, argmax, stderr = entry.grid, entry.argmax, entry.stderr
        raw = parsed.model_dump(mode="json")
        return cls(
            hook=hook,
            layers=parsed.layers,
            positions=parsed.positions,
            metric=parsed.metric,
            grid=grid,
            clean=parsed.clean,
            corrupt=parsed.corrupt,
            argmax=None if argmax is None else argmax.model_dump(mode="json"),
            skipped=[s.model_dump(mode="json") for s in parsed.skipped if s.hook == hook],
            alignment=raw["alignment"],
            noise_floor=parsed.noise_floor,
            auto_captured=parsed.auto_captured,
            captured_source_run=parsed.captured_source_run,
            source_run=parsed.source_run,
            heads=parsed.heads,
            tokens=parsed.tokens,
            timing=raw["timing"],
            baselines=raw["baselines"],
            answer_token_id=parsed.answer_token_id,
            answer_token=parsed.answer_token,
            foil_token_id=parsed.foil_token_id,
            foil_token=parsed.foil_token,
            answer_token_ids=parsed.answer_token_ids,
            foil_token_ids=parsed.foil_token_ids,
            per_position=parsed.per_position,
            hooks=parsed.hooks,
            model=parsed.model,
            warnings=parsed.warnings,
            server_side=server_side,
            raw=raw,
            window=parsed.window,
            stderr=stderr,
            noise=raw.get("noise"),
            method=parsed.method,
            kinds=None if parsed.kinds is None else parsed.kinds.get(hook),  # type: ignore[call-overload]
        )

    @classmethod
    def per_hook(
        cls, body: SweepBody | dict[str, Any], *, server_side: bool = True
    ) -> dict[str, SweepResult]:
        """``{hook: SweepResult}`` for every hook of a (multi-hook) response body."""
        parsed = body if isinstance(body, SweepBody) else SweepBody.model_validate(body)
        return {h: cls.from_body(parsed, h, server_side=server_side) for h in parsed.hooks}

    # -- arrays -------------------------------------------------------------------------

    def to_numpy(self) -> np.ndarray:
        """The grid as float64, ``NaN`` for skipped cells: ``[layers, positions(, heads)]``."""

        def convert(x: Any) -> Any:
            if isinstance(x, list):
                return [convert(v) for v in x]
            return math.nan if x is None else float(x)

        out = np.asarray(convert(self.grid), dtype=np.float64)
        if out.size == 0:
            shape: tuple[int, ...] = (len(self.layers), len(self.positions))
            if self.by_head:
                return np.zeros((len(self.layers), len(self.heads or [])))
            if self.heads is not None and self.hook == "attn_head":
                shape = (*shape, len(self.heads))
            return np.zeros(shape)
        return out

    def exact_mask(self) -> np.ndarray:
        """``True`` where the cell's value is exact, ``False`` where it is a first-order
        estimate or skipped; the grid's shape. Every computed cell of an exact sweep."""
        if self.kinds is None:
            return ~np.isnan(self.to_numpy())
        return np.asarray(self.kinds, dtype=object) == "exact"

    @property
    def by_head(self) -> bool:
        """An ``attn_head`` grid of (layer, head) cells, each patched at every position."""
        return self.hook == "attn_head" and not self.per_position

    @property
    def lower_is_better(self) -> bool:
        """Whether a lower value means more restored (``kl``)."""
        return self.metric in LOWER_IS_BETTER

    @property
    def center(self) -> float:
        """The neutral value of the heatmap: 0 for ``recovered``, else the corrupt baseline."""
        if self.metric == "recovered" or self.corrupt is None:
            return 0.0
        return float(self.corrupt)

    def token_labels(self) -> list[str]:
        """One axis label per swept position (position index and token string)."""
        return [token_label(p, self.tokens) for p in self.positions]

    def _cell(self, index: tuple[int, ...], value: float) -> dict[str, Any]:
        if self.by_head:
            assert self.heads is not None
            layer, head = self.layers[index[0]], self.heads[index[1]]
            return {"layer": layer, "head": head, "value": float(value)}
        cell: dict[str, Any] = {
            "layer": self.layers[index[0]],
            "position": self.positions[index[1]],
            "value": float(value),
        }
        if len(index) > 2 and self.heads is not None:
            cell["head"] = self.heads[index[2]]
        cell["token"] = self.tokens[cell["position"]] if cell["position"] < len(self.tokens) else ""
        return cell

    def value(self, layer: int, position: int | None, head: int | None = None) -> float | None:
        """The metric of one cell by layer/position (and head) number; None if skipped
        (``position=None`` for a head sweep that is not per position)."""
        if self.by_head:
            if position is not None or head is None or self.heads is None:
                raise ValueError("this head sweep is not per position: value(layer, None, head)")
            cell = self.grid[self.layers.index(layer)][self.heads.index(head)]
            return None if cell is None else float(cell)
        if position is None:
            raise ValueError("position is None only for a head sweep that is not per position")
        i, j = self.layers.index(layer), self.positions.index(position)
        cell = self.grid[i][j]
        if head is not None:
            assert self.heads is not None
            cell = cell[self.heads.index(head)]
        return None if cell is None else float(cell)

    def argmax_cell(self) -> dict[str, Any] | None:
        """The most restored cell: ``{layer, position, value, token(, head)}``.

        Like the server's ``argmax``: the largest value, or the smallest for metrics
        where lower is better (``kl``).
        """
        cells = self.top(1)
        return cells[0] if cells else None

    def top(self, k: int = 5, largest: bool | None = None) -> list[dict[str, Any]]:
        """The ``k`` most restored cells, best first (``largest=None``: by the metric's sense).

        Skipped cells are left out. Each entry: ``{layer, position, value, token(, head)}``.
        """
        if largest is None:
            largest = not self.lower_is_better
        values = self.to_numpy()
        finite = [(idx, v) for idx, v in np.ndenumerate(values) if not math.isnan(v)]
        finite.sort(key=lambda item: -item[1] if largest else item[1])  # stable: grid order
        return [self._cell(idx, v) for idx, v in finite[: max(k, 0)]]

    # -- plotting -----------------------------------------------------------------------

    def heatmap(
        self,
        ax: Axes | None = None,
        *,
        head: int | None = None,
        title: str | None = None,
        cmap: str | None = None,
        annotate: bool | None = None,
        colorbar: bool = True,
        vmin: float | None = None,
        vmax: float | None = None,
        center: float | None = None,
    ) -> Axes:
        """Draw the grid with matplotlib and return the Axes.

        Token strings on the x axis (corrupted tokens starred, in red), layers on
        the y axis (layer 0 at the bottom), skipped cells grey with a legend entry.
        The colour scale is fixed, not stretched to the data: ``recovered`` −1…1;
        ``kl`` 0…max with the dark end "more restored"; other metrics diverge
        around the corrupt baseline wide enough to hold the clean one.
        ``vmin``/``vmax``/``center`` override it. ``attn_head`` grids show one
        column per (position, head), labelled, or one ``head``. ``annotate``
        writes the values in the cells (default: at most 150 cells). Several hooks
        on one scale: :func:`patchserve.client.figures.heatmaps`.
        """
        from patchserve.client.figures import heatmap

        return heatmap(
            self,
            ax,
            head=head,
            title=title,
            cmap=cmap,
            annotate=annotate,
            colorbar=colorbar,
            vmin=vmin,
            vmax=vmax,
            center=center,
        )

    # -- pandas -------------------------------------------------------------------------

    def to_pandas(self) -> Any:
        """The grid as a ``pandas.DataFrame``: one row per layer, one column per position.

        Columns are a ``(position, token)`` MultiIndex (``attn_head``: ``(position,
        token, head)``). pandas is imported here, not with the client.
        """
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("SweepResult.to_pandas() needs pandas: pip install pandas") from exc
        values = self.to_numpy()
        tokens = [self.tokens[p] if p < len(self.tokens) else "" for p in self.positions]
        index = pd.Index(self.layers, name="layer")
        if self.by_head:
            return pd.DataFrame(values, index=index, columns=pd.Index(self.heads, name="head"))
        if values.ndim == 3:
            assert self.heads is not None
            columns = pd.MultiIndex.from_tuples(
                [
                    (p, t, h)
                    for p, t in zip(self.positions, tokens, strict=True)
                    for h in self.heads
                ],
                names=["position", "token", "head"],
            )
            return pd.DataFrame(values.reshape(len(self.layers), -1), index=index, columns=columns)
        columns = pd.MultiIndex.from_tuples(
            list(zip(self.positions, tokens, strict=True)), names=["position", "token"]
        )
        return pd.DataFrame(values, index=index, columns=columns)


@dataclass
class ZoomResult:
    """A coarse-to-fine study: the coarse sweep, the refined one and what was chosen."""

    coarse: SweepResult
    fine: SweepResult
    stride: int
    block: list[int]
    positions: list[int]
    source_run: str | None = None

    def heatmap(self, ax: Axes | None = None, **kwargs: Any) -> Axes:
        """The fine grid's heatmap (see :meth:`SweepResult.heatmap`)."""
        return self.fine.heatmap(ax, **kwargs)

    def top(self, k: int = 5, largest: bool | None = None) -> list[dict[str, Any]]:
        """The fine grid's best cells (see :meth:`SweepResult.top`)."""
        return self.fine.top(k, largest)
