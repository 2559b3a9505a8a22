"""The hooked model runtime: families, loading, the transformer and its hook sites."""

from patchserve.models.config import CheckpointError, ModelConfig
from patchserve.models.hooks import HOOKS, INJECTABLE_HOOKS, HookContext, SiteEdit, make_edit
from patchserve.models.invariance import pack_weights
from patchserve.models.layout import ResumeRows
from patchserve.models.loading import LoadedModel, load_model
from patchserve.models.placement import DeviceMapError, Placement
from patchserve.models.registry import SUPPORTED_ARCHITECTURES
from patchserve.models.state import KVCache, Reuse
from patchserve.models.transformer import CachedPass, Transformer

__all__ = [
    "HOOKS",
    "INJECTABLE_HOOKS",
    "SUPPORTED_ARCHITECTURES",
    "CachedPass",
    "CheckpointError",
    "DeviceMapError",
    "HookContext",
    "KVCache",
    "LoadedModel",
    "ModelConfig",
    "Placement",
    "ResumeRows",
    "Reuse",
    "SiteEdit",
    "Transformer",
    "load_model",
    "make_edit",
    "pack_weights",
]
