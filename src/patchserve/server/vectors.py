"""``patch_vectors`` tables in requests: unpacking and row lookup with 4xx errors."""

from __future__ import annotations

from typing import Any

import numpy as np

from patchserve.engine import RequestError
from patchserve.wire.packing import PackingError, unpack_vectors


def unpack_table(packed: Any) -> np.ndarray | None:
    """The request's ``patch_vectors`` as a float32 ``[rows, width]`` array (None if absent)."""
    if packed is None:
        return None
    try:
        return unpack_vectors(packed.model_dump() if hasattr(packed, "model_dump") else packed)
    except PackingError as exc:
        raise RequestError(str(exc), "patch_vectors") from exc


def table_row(table: np.ndarray | None, index: int, width: int | None, param: str) -> np.ndarray:
    """Row ``index`` of the table, checked against the hook ``width`` when given."""
    if table is None:
        raise RequestError(f"{param} needs patch_vectors", param)
    if not 0 <= index < table.shape[0]:
        raise RequestError(
            f"{param} row {index} is out of range; patch_vectors has {table.shape[0]} rows", param
        )
    if width is not None and table.shape[1] != width:
        raise RequestError(f"{param} is {table.shape[1]} wide; the hook is {width} wide", param)
    return table[index]
