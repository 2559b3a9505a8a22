"""patchserve: an activation-patching server for transformer language models.

The client names (``PatchStudy``, ``AsyncPatchStudy``, ``Span``, ``SweepResult``,
``CleanRun``, ...) are re-exported from :mod:`patchserve.client` on first access,
so ``import patchserve`` stays light (no torch, no httpx) for the server too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_CLIENT_NAMES = (
    "APIConnectionError",
    "AsyncPatchStudy",
    "AuthenticationError",
    "BadRequestError",
    "CleanRun",
    "ConflictError",
    "NotFoundError",
    "PatchServeError",
    "PatchServeWarning",
    "PatchStudy",
    "RequestTooLargeError",
    "Span",
    "SweepResult",
    "ZoomResult",
    "pack_vectors",
)

if TYPE_CHECKING:
    from patchserve.client import (
        APIConnectionError,
        AsyncPatchStudy,
        AuthenticationError,
        BadRequestError,
        CleanRun,
        ConflictError,
        NotFoundError,
        PatchServeError,
        PatchServeWarning,
        PatchStudy,
        RequestTooLargeError,
        Span,
        SweepResult,
        ZoomResult,
        pack_vectors,
    )

__all__ = [
    "APIConnectionError",
    "AsyncPatchStudy",
    "AuthenticationError",
    "BadRequestError",
    "CleanRun",
    "ConflictError",
    "NotFoundError",
    "PatchServeError",
    "PatchServeWarning",
    "PatchStudy",
    "RequestTooLargeError",
    "Span",
    "SweepResult",
    "ZoomResult",
    "__version__",
    "pack_vectors",
]


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from patchserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'patchserve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_CLIENT_NAMES])
