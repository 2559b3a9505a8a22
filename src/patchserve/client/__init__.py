"""The Python client of a patchserve server: ``PatchStudy`` (sync) and ``AsyncPatchStudy``.

``from patchserve import PatchStudy, Span`` is the usual entry point (docs/api.md §3).
The client needs httpx and numpy only; matplotlib and pandas are imported by
``SweepResult.heatmap()`` / ``to_pandas()`` when called, and torch only by the
client-side per-cell path (``server_side=False``), which grades with the
server's own metric definitions.
"""

from patchserve.client.errors import (
    APIConnectionError,
    APIResponseError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InsufficientStorageError,
    InternalServerError,
    NotFoundError,
    PatchServeError,
    PatchServeWarning,
    RequestTooLargeError,
)
from patchserve.client.facts import RoleResult, StudyResult
from patchserve.client.results import CleanRun, SweepResult, ZoomResult
from patchserve.client.study import AsyncPatchStudy, PatchStudy
from patchserve.text.spans import Span
from patchserve.wire.packing import pack_vectors

__all__ = [
    "APIConnectionError",
    "APIResponseError",
    "AsyncPatchStudy",
    "AuthenticationError",
    "BadRequestError",
    "CleanRun",
    "ConflictError",
    "InsufficientStorageError",
    "InternalServerError",
    "NotFoundError",
    "PatchServeError",
    "PatchServeWarning",
    "PatchStudy",
    "RequestTooLargeError",
    "RoleResult",
    "Span",
    "StudyResult",
    "SweepResult",
    "ZoomResult",
    "pack_vectors",
]
