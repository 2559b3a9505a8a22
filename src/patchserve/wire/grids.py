"""Laying graded cells out as a grid and picking the most restored one (torch-free).

``grid[i][j]`` is layer ``layers[i]`` at position ``positions[j]``
(``grid[i][j][k]`` for ``heads[k]`` when ``heads`` is given; ``grid[i][k]`` for a
head sweep that is not per position); cells never
graded stay ``None``. The best cell is the largest value, or the smallest for
metrics where lower is better (``kl``); ties keep the first in cell order.
The engine and the client's per-cell path both assemble their grids here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, TypeVar

from patchserve.wire.hooks import LOWER_IS_BETTER


class GradedCell(Protocol):
    @property
    def layer(self) -> int: ...
    @property
    def position(self) -> int | None: ...
    @property
    def head(self) -> int | None: ...
    @property
    def value(self) -> float | None: ...


C = TypeVar("C", bound=GradedCell)


def assemble_grid(
    cells: Iterable[C],
    layers: list[int],
    positions: list[int],
    heads: list[int] | None,
    metric: str,
    per_position: bool = True,
) -> tuple[list[Any], C | None]:
    """The grid of ``cells`` and the most restored of them (None if none was graded).

    With ``heads`` and not ``per_position`` the grid is ``grid[i][k]`` (layer, head): each
    cell patched its head at every selected position at once (its ``position`` is None)."""
    li = {layer: i for i, layer in enumerate(layers)}
    pi = {p: j for j, p in enumerate(positions)}
    grid: list[Any]
    if heads is not None:
        hi = {h: k for k, h in enumerate(heads)}
        grid = [[[None] * len(heads) for _ in positions] for _ in layers]
        if not per_position:
            grid = [[None] * len(heads) for _ in layers]
    else:
        grid = [[None] * len(positions) for _ in layers]
    lower = metric in LOWER_IS_BETTER
    best: C | None = None
    for cell in cells:
        value = cell.value
        row = grid[li[cell.layer]]
        if cell.position is None:
            assert cell.head is not None
            row[hi[cell.head]] = value
        elif cell.head is None:
            row[pi[cell.position]] = value
        else:
            row[pi[cell.position]][hi[cell.head]] = value
        if value is None:
            continue
        if (
            best is None
            or best.value is None
            or (value < best.value if lower else value > best.value)
        ):
            best = cell
    return grid, best
