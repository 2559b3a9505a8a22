"""Where a ``transformers`` causal LM keeps what our hooks name, found from its module tree.

The decoder-layer list (the ``nn.ModuleList`` of ``num_hidden_layers`` entries inside the
base model), each layer's attention and MLP submodules, the attention's output projection
(whose input is the per-head outputs, ``attn_head``) and the final norm. Nothing here is
trusted for numbers: ``probe.py`` checks at load time which of these give our hooks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from patchserve.models.config import CheckpointError

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "norm_f", "final_norm", "final_layer_norm")


@dataclass
class Structure:
    """The discovered modules of one ``transformers`` causal LM (None: not found)."""

    base_name: str  # the attribute of the causal LM that holds the base model
    layers: nn.ModuleList
    attention: list[nn.Module | None]
    mlp: list[nn.Module | None]
    out_proj: list[nn.Linear | None]
    final_norm: nn.Module | None


def text_config(hf: nn.Module) -> Any:
    config: Any = hf.config
    return config.get_text_config(decoder=True)


def _child(module: nn.Module, names: tuple[str, ...], kinds: tuple[str, ...]) -> nn.Module | None:
    """The child named like one of ``names``, else the one whose class name holds a kind."""
    children = dict(module.named_children())
    for name in names:
        if name in children:
            return children[name]
    for child in children.values():
        if any(kind in type(child).__name__.lower() for kind in kinds):
            return child
    return None


def _layer_list(base: nn.Module, count: int) -> nn.ModuleList:
    """The base model's decoder layers: its ``ModuleList`` of ``count`` layers, nearest first."""
    found = [
        (name.count("."), name, m)
        for name, m in base.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == count and name
    ]
    if not found:
        raise CheckpointError(
            f"{type(base).__name__} has no list of {count} decoder layers "
            "(num_hidden_layers); the generic runtime cannot find its blocks"
        )
    return min(found, key=lambda f: (f[0], f[1]))[2]


def _out_proj(attention: nn.Module | None) -> nn.Linear | None:
    if attention is None:
        return None
    children = dict(attention.named_children())
    for name in OUT_PROJ_NAMES:
        child = children.get(name)
        if isinstance(child, nn.Linear):
            return child
    return None


def discover(hf: nn.Module) -> Structure:
    """The modules of ``hf`` (a ``transformers`` causal LM) that our hooks sit on."""
    base_name = getattr(hf, "base_model_prefix", "model")
    base = getattr(hf, base_name, None)
    if not isinstance(base, nn.Module):
        raise CheckpointError(
            f"{type(hf).__name__} has no base model at .{base_name}; "
            "the generic runtime serves decoder-only causal LMs"
        )
    count = int(text_config(hf).num_hidden_layers)
    layers = _layer_list(base, count)
    attention = [_child(layer, ATTENTION_NAMES, ("attention",)) for layer in layers]
    mlp = [_child(layer, MLP_NAMES, ("mlp", "feedforward", "moe")) for layer in layers]
    norm = _child(base, FINAL_NORM_NAMES, ())
    return Structure(base_name, layers, attention, mlp, [_out_proj(a) for a in attention], norm)
