"""Naive per-cell oracles for sweeps: one full forward of the readable reference model
(``patchserve.models.reference``, which shares no code with the optimised runtime) per cell."""

from __future__ import annotations

import torch

from patchserve.engine.metrics import Grader
from patchserve.models import Transformer
from patchserve.models.reference import reference_forward


def naive_cell(
    model: Transformer,
    corrupt_ids: list[int],
    hook: str,
    layer: int,
    position: int,
    source: torch.Tensor,
    grader: Grader,
    *,
    head: int | None = None,
    alpha: float = 1.0,
    mask: torch.Tensor | None = None,
) -> float:
    """The metric of one patched cell: ``(1 - alpha*m) * h + alpha*m * s`` written at the
    site in a plain reference forward of the whole prompt."""
    weight = torch.full_like(source, alpha, dtype=torch.float32)
    if mask is not None:
        weight = weight * mask.float()

    def write(at_layer: int, at_hook: str, x: torch.Tensor) -> torch.Tensor:
        if (at_layer, at_hook) != (layer, hook):
            return x
        x = x.clone()
        index = (0, position) if head is None else (0, position, head)
        h = x[index]
        x[index] = ((1 - weight) * h.float() + weight * source.float()).to(x.dtype)
        return x

    logits, _ = reference_forward(model, torch.tensor([corrupt_ids]), write)
    return float(grader(logits[:, -1])[0])


def reference_modules(ref, family: str) -> tuple[list, str, str]:
    """transformers decoder layers and the names of their attention / MLP branch modules."""
    if family.startswith("gpt2"):
        return list(ref.transformer.h), "attn", "mlp"
    if family.startswith("gpt_neox"):
        return list(ref.gpt_neox.layers), "attention", "mlp"
    if family.startswith("gemma"):
        return list(ref.model.layers), "post_attention_layernorm", "post_feedforward_layernorm"
    return list(ref.model.layers), "self_attn", "mlp"


def transformers_cell(
    ref, family: str, corrupt_ids: list[int], hook: str, layer: int, position: int, source
) -> torch.Tensor:
    """Last-position logits of ``transformers`` with the site overwritten by a module hook."""
    layers, attn, mlp = reference_modules(ref, family)

    def write(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, position] = source
        return t

    def on_output(_module, _inputs, output):
        if isinstance(output, tuple):
            return (write(output[0]), *output[1:])
        return write(output)

    def on_input(_module, args, kwargs):
        if args:
            return (write(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": write(kwargs["hidden_states"])}

    block = layers[layer]
    if hook == "post_block":
        handle = block.register_forward_hook(on_output)
    elif hook == "pre_attn":
        handle = block.register_forward_pre_hook(on_input, with_kwargs=True)
    elif hook == "attn_out":
        handle = getattr(block, attn).register_forward_hook(on_output)
    elif hook == "mlp_out":
        handle = getattr(block, mlp).register_forward_hook(on_output)
    else:
        raise ValueError(hook)
    try:
        with torch.inference_mode():
            return ref(torch.tensor([corrupt_ids])).logits[0, -1]
    finally:
        handle.remove()
