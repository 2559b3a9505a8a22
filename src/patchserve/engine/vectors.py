"""``patch_vectors`` tables in requests: unpacking and row lookup with 4xx errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from patchserve.engine.errors import InvalidArgument
from patchserve.wire.packing import PackingError, unpack_vectors


def unpack_table(packed: Any) -> np.ndarray | None:
    """The request's ``patch_vectors`` as a float32 ``[rows, width]`` array (None if absent)."""
    if packed is None:
        return None
    try:
        return unpack_vectors(packed.model_dump() if hasattr(packed, "model_dump") else packed)
    except PackingError as exc:
        raise InvalidArgument(str(exc), "patch_vectors") from exc


def table_row(table: np.ndarray | None, index: int, width: int | None, param: str) -> np.ndarray:
    """Row ``index`` of the table, checked against the hook ``width`` when given."""
    if table is None:
        raise InvalidArgument(f"{param} needs patch_vectors", param)
    if not 0 <= index < table.shape[0]:
        raise InvalidArgument(
            f"{param} row {index} is out of range; patch_vectors has {table.shape[0]} rows", param
        )
    if width is not None and table.shape[1] != width:
        raise InvalidArgument(f"{param} is {table.shape[1]} wide; the hook is {width} wide", param)
    row: np.ndarray = table[index]
    return row


def mask_vector(
    indices: list[int] | None,
    inline: int | None,
    width: int,
    table: np.ndarray | None,
    param: str,
    where: str,
) -> torch.Tensor:
    """A per-dimension mask of ``width``: a 0/1 mask of ``indices`` or a row of the table."""
    if (indices is None) == (inline is None):
        raise InvalidArgument("mask needs exactly one of indices and inline", param)
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < width]
        if bad:
            raise InvalidArgument(f"mask indices {bad} are outside {where}'s width {width}", param)
        mask = torch.zeros(width)
        mask[indices] = 1.0
        return mask
    assert inline is not None
    return torch.from_numpy(table_row(table, inline, width, param).copy())
