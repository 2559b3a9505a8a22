"""Heatmaps of sweep results a researcher can put in a paper (matplotlib, imported on use).

The colour scale is explicit and honest, never stretched to the data's own
extremes:

* ``recovered``: fixed −1 … 1 around 0 (values beyond are clipped; the colour
  bar says so with its arrows);
* ``kl``: 0 … the largest value (at least the corrupt baseline), a sequential
  map whose dark end is "more restored" (lower KL);
* ``logprob``, ``prob``, ``logit_diff``: diverging around the corrupt baseline,
  wide enough to hold the clean baseline, so noise on a random model is pale.

``vmin``/``vmax``/``center`` override any of it. Several results drawn
together (:func:`heatmaps`) share one scale and one colour bar; results whose
corrupt baselines differ are refused unless ``center`` is given (one centre
cannot mean "no change" for both). Titles name
the hook, metric, answer (and foil), model and both baselines; skipped cells
are grey with a legend entry; corrupted tokens are starred and red on the
axis; ``attn_head`` grids show every head as its own labelled column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from patchserve.wire.hooks import LOWER_IS_BETTER

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure

    from patchserve.client.facts import RoleResult
    from patchserve.client.results import SweepResult

SKIPPED_COLOUR = "#c8c8c8"
CORRUPTED_COLOUR = "#b2182b"
ANNOTATE_MAX_CELLS = 150


@dataclass(frozen=True)
class ColourScale:
    """The norm and colour map of one figure, and what its colour bar says."""

    norm: Normalize
    cmap: Colormap
    label: str
    extend: str  # "neither" | "both" | "min" | "max": values beyond the scale are clipped


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def scale_bounds(
    metric: str, values: np.ndarray, clean: float | None, corrupt: float | None
) -> tuple[float, float, float]:
    """``(low, centre, high)`` of the colour scale by this module's rules; ``centre`` is NaN
    for a sequential scale (``kl``). Used by the figures and the terminal table alike."""
    data = _finite(np.asarray(values, dtype=np.float64)).ravel()
    if metric == "recovered":
        return -1.0, 0.0, 1.0
    if metric in LOWER_IS_BETTER:
        top = max([float(data.max()) if data.size else 0.0, corrupt or 0.0, 1e-9])
        return 0.0, math.nan, top
    mid = float(corrupt) if corrupt is not None else 0.0
    half = float(np.abs(data - mid).max()) if data.size else 0.0
    if clean is not None:
        half = max(half, abs(float(clean) - mid))
    half = half if half > 0 else 1e-6
    return mid - half, mid, mid + half


class Scaled(Protocol):
    """What a colour scale reads of a result (a sweep's or a study's aggregate)."""

    metric: str
    clean: float | None
    corrupt: float | None

    def to_numpy(self) -> np.ndarray: ...


def colour_scale(
    results: Sequence[Scaled],
    vmin: float | None = None,
    vmax: float | None = None,
    center: float | None = None,
    cmap: str | None = None,
) -> ColourScale:
    """One scale for ``results`` (all of one metric), by the rules of this module."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize, TwoSlopeNorm

    metrics = {r.metric for r in results}
    if len(metrics) != 1:
        raise ValueError(f"results of different metrics share no scale: {sorted(metrics)}")
    metric = metrics.pop()
    data = np.concatenate([_finite(r.to_numpy()).ravel() for r in results] + [np.zeros(0)])
    first = results[0]
    centred = metric not in ("recovered", *LOWER_IS_BETTER) and center is None
    baselines = {r.corrupt for r in results}
    if centred and len(baselines) > 1 and np.ptp([b or 0.0 for b in baselines]) > 1e-9:
        # white must mean "no change" in every panel: one centre cannot serve two baselines
        raise ValueError(
            f"these {metric} results have different corrupt baselines "
            f"({', '.join(f'{b:.4g}' for b in sorted(b or 0.0 for b in baselines))}); pass "
            "center= for one shared scale, or draw them separately"
        )
    low, mid, high = scale_bounds(metric, data, first.clean, first.corrupt)
    if metric == "recovered":
        name, label = "RdBu_r", "recovered (1 = clean, 0 = corrupt)"
    elif metric in LOWER_IS_BETTER:
        name, label = "Reds_r", f"{metric}: lower = more restored (dark)"
    else:
        name, label = "RdBu_r", f"{metric} (centre = corrupt {mid:.3g})"
    low = low if vmin is None else vmin
    high = high if vmax is None else vmax
    mid = mid if center is None else center
    if not low < high:
        raise ValueError(f"the colour scale needs vmin < vmax, got {low} and {high}")
    if math.isnan(mid) or not low < mid < high:
        norm: Normalize = Normalize(vmin=low, vmax=high, clip=False)
    else:
        norm = TwoSlopeNorm(vcenter=mid, vmin=low, vmax=high)
    below = bool(data.size and data.min() < low)
    above = bool(data.size and data.max() > high)
    extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get(
        (below, above), "neither"
    )
    colormap = plt.get_cmap(cmap or name).with_extremes(bad=SKIPPED_COLOUR)
    return ColourScale(norm, colormap, label, extend)


def _columns(result: SweepResult, head: int | None) -> tuple[np.ndarray, list[str], list[int]]:
    """The 2-D values, one label per column and the position of each column."""
    values = result.to_numpy()
    if result.by_head:  # (layer, head): no position axis; -1 marks no token in a column
        assert result.heads is not None
        return values, [f"h{h}" for h in result.heads], [-1] * len(result.heads)
    labels = result.token_labels()
    if values.ndim == 2:
        return values, labels, list(result.positions)
    assert result.heads is not None
    if head is not None:
        return values[:, :, result.heads.index(head)], labels, list(result.positions)
    flat = values.reshape(values.shape[0], -1)  # position-major: (p0 h0, p0 h1, ..., p1 h0, ...)
    columns = [f"{label} h{h}" for label in labels for h in result.heads]
    positions = [p for p in result.positions for _ in result.heads]
    return flat, columns, positions


def _title(result: SweepResult, head: int | None) -> str:
    answer = result.answer_token if result.answer_token is not None else result.answer_token_id
    what = f"{result.hook}{f' head {head}' if head is not None else ''}: {result.metric}"
    what += f" of {answer!r}"
    if result.foil_token_id is not None:
        foil = result.foil_token if result.foil_token is not None else result.foil_token_id
        what += f" vs {foil!r}"
    facts = []
    if result.model:
        facts.append(result.model)
    raw = "logit diff" if result.foil_token_id is not None else "logprob"
    unit = f" ({raw})" if result.metric == "recovered" else ""
    if result.clean is not None:
        facts.append(f"clean {result.clean:.3g}{unit}")
    if result.corrupt is not None:
        facts.append(f"corrupt {result.corrupt:.3g}{unit}")
    return what + ("\n" + " · ".join(facts) if facts else "")


def draw(
    result: SweepResult,
    ax: Axes,
    scale: ColourScale,
    *,
    head: int | None = None,
    title: str | None = None,
    annotate: bool | None = None,
) -> Any:
    """Draw one result on ``ax`` with ``scale``; returns the image (for a colour bar)."""
    from matplotlib.patches import Patch

    values, labels, positions = _columns(result, head)
    image = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=scale.cmap,
        norm=scale.norm,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
    )
    differing = set((result.alignment or {}).get("differing_positions") or [])
    marked = [
        f"{text} *" if p in differing else text for text, p in zip(labels, positions, strict=True)
    ]
    ax.set_xticks(range(len(labels)), marked, rotation=60, ha="right")
    for tick, p in zip(ax.get_xticklabels(), positions, strict=True):
        if p in differing:
            tick.set_color(CORRUPTED_COLOUR)
    if len(positions) > len(set(positions)) and not result.by_head:  # a gap between positions
        for boundary in np.flatnonzero(np.diff(positions)) + 0.5:
            ax.axvline(boundary, color="white", linewidth=2)
    ax.set_yticks(range(len(result.layers)), [str(layer) for layer in result.layers])
    if result.by_head:
        ax.set_xlabel(f"head (patched at all {len(result.positions)} selected positions)")
    else:
        ax.set_xlabel("position (token; * = corrupted)" if differing else "position (token)")
    ax.set_ylabel("layer")
    ax.set_title(title or _title(result, head), fontsize=10)
    if annotate is None:
        annotate = values.size <= ANNOTATE_MAX_CELLS
    if annotate:
        _annotate(ax, values, scale)
    if np.isnan(values).any():
        skipped = Patch(
            facecolor=SKIPPED_COLOUR, edgecolor="none", label="skipped (no aligned clean position)"
        )
        ax.legend(
            handles=[skipped],
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
            fontsize=8,
            borderaxespad=0.2,
        )
    return image


def _annotate(ax: Axes, values: np.ndarray, scale: ColourScale) -> None:
    """Each cell's value, in white on dark colours."""
    for (i, j), v in np.ndenumerate(values):
        if not math.isnan(v):
            shade = float(np.clip(scale.norm(v), 0, 1))
            dark = abs(shade - 0.5) > 0.3 if scale.cmap.name != "Reds_r" else shade < 0.45
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if dark else "black",
            )  # fmt: skip


def _size(columns: int, rows: int, panels: int = 1) -> tuple[float, float]:
    width = min(max(6.0, 2.5 + 0.55 * columns), 24.0)
    height = min(max(3.5, 2.0 + 0.42 * rows), 16.0)
    return width, height * panels


def heatmaps(
    results: Mapping[str, SweepResult] | Sequence[SweepResult],
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    center: float | None = None,
    cmap: str | None = None,
    annotate: bool | None = None,
    head: int | None = None,
) -> Figure:
    """Several results (e.g. ``attn_out`` and ``mlp_out`` of one study) stacked in one
    figure on one shared colour scale with one colour bar."""
    import matplotlib.pyplot as plt

    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not items:
        raise ValueError("no results to draw")
    scale = colour_scale(items, vmin, vmax, center, cmap)
    columns = max(_columns(r, head)[0].shape[1] for r in items)
    rows = max(len(r.layers) for r in items)
    figure, axes = plt.subplots(
        len(items), 1, figsize=_size(columns, rows, len(items)), layout="constrained", squeeze=False
    )
    images = [
        draw(result, ax, scale, head=head, annotate=annotate)
        for result, ax in zip(items, axes[:, 0], strict=True)
    ]
    bar = figure.colorbar(images[0], ax=list(axes[:, 0]), extend=scale.extend, shrink=0.9)
    bar.set_label(scale.label)
    return figure


def heatmap(
    result: SweepResult,
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
    """One result on ``ax`` (a new figure if None), by the rules of this module."""
    import matplotlib.pyplot as plt

    scale = colour_scale([result], vmin, vmax, center, cmap)
    if ax is None:
        values = _columns(result, head)[0]
        _, ax = plt.subplots(figsize=_size(values.shape[1], values.shape[0]), layout="constrained")
    image = draw(result, ax, scale, head=head, title=title, annotate=annotate)
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, extend=scale.extend)
        bar.set_label(scale.label)
    return ax


def _role_title(result: RoleResult) -> str:
    window = f", window {result.window}" if result.window > 1 else ""
    what = f"{result.metric} - corrupt (indirect effect)" if result.is_effect else result.metric
    if result.is_effect and result.clean is not None:
        facts = f"clean - corrupt {result.clean:.3g}"
    else:
        facts = f"corrupt {result.corrupt:.3g}"
        facts += f" · clean {result.clean:.3g}" if result.clean is not None else ""
    return f"{result.hook}{window}: mean {what} over {result.items} facts\n{facts}"


def role_heatmap(
    result: RoleResult,
    ax: Axes | None = None,
    *,
    title: str | None = None,
    cmap: str | None = None,
    annotate: bool = True,
    vmin: float | None = None,
    vmax: float | None = None,
    center: float | None = None,
) -> Axes:
    """ROME's averaged figure: token roles as rows, layers as columns, on this module's
    scale (``prob``/``logprob``: centred on the items' mean corrupt baseline)."""
    import matplotlib.pyplot as plt

    scale = colour_scale([result], vmin, vmax, center, cmap)
    values = result.to_numpy().T  # [roles, layers]
    if ax is None:
        _, ax = plt.subplots(
            figsize=(max(5.0, 3.2 + 0.5 * len(result.layers)), 3.6), layout="constrained"
        )
    image = ax.imshow(
        np.ma.masked_invalid(values),
        cmap=scale.cmap,
        norm=scale.norm,
        aspect="auto",
        interpolation="nearest",
    )
    labels = [f"{role} ({n})" for role, n in zip(result.roles, result.counts, strict=True)]
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(len(result.layers)), [str(layer) for layer in result.layers])
    ax.set_xlabel(f"layer (window {result.window})" if result.window > 1 else "layer")
    ax.set_title(title or _role_title(result), fontsize=10)
    if annotate:
        _annotate(ax, values, scale)
    bar = ax.figure.colorbar(image, ax=ax, extend=scale.extend)
    bar.set_label(f"{result.metric} - corrupt" if result.is_effect else scale.label)
    return ax
