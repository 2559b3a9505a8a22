"""Packed vectors: ``{"dtype", "shape": [rows, width], "data": base64}`` (docs/api.md §1).

Little-endian, C-contiguous bytes. ``bfloat16`` is handled with numpy alone
(the top 16 bits of a float32, rounded to nearest even), so the client needs
no torch.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")


class PackingError(ValueError):
    """A packed tensor that cannot be decoded; the message says why."""


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (rounded >> 16).astype("<u2")
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def pack_vectors(array: Any, dtype: str = "float32") -> dict[str, Any]:
    """Pack a 2-D (or 1-D, as one row) array."""
    if dtype not in DTYPES:
        raise PackingError(f"dtype must be one of {', '.join(DTYPES)}")
    values = np.asarray(array, dtype=np.float32)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2:
        raise PackingError("packed vectors must be 2-D [rows, width]")
    if dtype == "bfloat16":
        raw = _to_bfloat16_bits(values).tobytes()
    else:
        raw = np.ascontiguousarray(values, dtype="<f4" if dtype == "float32" else "<f2").tobytes()
    return {
        "dtype": dtype,
        "shape": [int(values.shape[0]), int(values.shape[1])],
        "data": base64.b64encode(raw).decode("ascii"),
    }


def unpack_vectors(packed: Any) -> np.ndarray:
    """A float32 ``[rows, width]`` array from its packed form; PackingError if malformed."""
    if not isinstance(packed, dict):
        raise PackingError("packed vectors must be an object with dtype, shape and data")
    dtype, shape, data = packed.get("dtype"), packed.get("shape"), packed.get("data")
    if dtype not in DTYPES:
        raise PackingError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise PackingError("shape must be [rows, width] with positive integers")
    if not isinstance(data, str):
        raise PackingError("data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PackingError(f"data is not valid base64: {exc}") from exc
    itemsize = 4 if dtype == "float32" else 2
    expected = shape[0] * shape[1] * itemsize
    if len(raw) != expected:
        raise PackingError(
            f"data holds {len(raw)} bytes; shape {shape} in {dtype} needs {expected}"
        )
    if dtype == "float32":
        out = np.frombuffer(raw, dtype="<f4")
    elif dtype == "float16":
        out = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:
        out = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    out = out.reshape(shape).astype(np.float32)
    if not np.isfinite(out).all():
        raise PackingError("packed vectors must be finite")
    return out
