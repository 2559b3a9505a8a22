"""The generic runtime: any other decoder-only ``AutoModelForCausalLM``, run in
``transformers`` with our hooks found from its module tree (``discovery.py``), verified at
load time (``probe.py``) and served through the engine's model surface (``model.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from patchserve.models.config import CheckpointError, ModelConfig
from patchserve.models.generic.discovery import discover, text_config
from patchserve.models.generic.model import TransformersModel, UnsupportedHook, refuse_hook
from patchserve.models.generic.probe import offered_hooks

__all__ = ["TransformersModel", "UnsupportedHook", "generic_config", "load_generic", "refuse_hook"]


def generic_config(hf: torch.nn.Module, architecture: str) -> ModelConfig:
    """The :class:`ModelConfig` fields the engine reads, from the ``transformers`` config.

    The runtime's own fields (norms, rope, MLP kind) stay at neutral values: nothing of the
    native runtime runs on this model.
    """
    tc = text_config(hf)
    d, heads, n = int(tc.hidden_size), int(tc.num_attention_heads), int(tc.num_hidden_layers)
    head_dim = int(getattr(tc, "head_dim", None) or d // heads)
    kv = getattr(tc, "num_key_value_heads", None)
    if kv is None:
        kv = 1 if getattr(tc, "multi_query", False) else heads
    head = hf.get_output_embeddings()  # type: ignore[operator]
    vocab = int(head.weight.shape[0]) if head is not None else int(tc.vocab_size)
    inner = getattr(tc, "intermediate_size", None) or getattr(tc, "n_inner", None) or 4 * d
    return ModelConfig(
        family="transformers",
        architecture=architecture,
        vocab_size=vocab,
        hidden_size=d,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=head_dim,
        intermediate_size=int(inner),
        norm_kind="rms",
        norm_eps=float(
            getattr(tc, "rms_norm_eps", None) or getattr(tc, "layer_norm_eps", None) or 0
        ),
        activation=str(getattr(tc, "hidden_act", None) or getattr(tc, "activation_function", "")),
        gated_mlp=False,
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        rope=(None,) * n,
        sliding_windows=(None,) * n,
        attn_scale=head_dim**-0.5,
        max_position_embeddings=int(getattr(tc, "max_position_embeddings", None) or 1 << 20),
        bos_token_id=getattr(tc, "bos_token_id", None),
        eos_token_id=getattr(tc, "eos_token_id", None),
    )


def load_generic(
    folder: Path, raw: dict[str, Any], device: str | torch.device, dtype: torch.dtype
) -> TransformersModel:
    """``folder`` loaded by ``transformers``, its hooks discovered and verified."""
    import transformers as tf

    architecture = (raw.get("architectures") or [None])[0] or str(raw.get("model_type"))
    if raw.get("is_encoder_decoder"):
        raise CheckpointError(f"{architecture} is an encoder-decoder model; not served")
    try:
        hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as exc:  # an unknown model type, missing weights, remote code...
        raise CheckpointError(
            f"{folder}: transformers cannot load {architecture} as a causal LM: {exc}"
        ) from exc
    named = raw.get("architectures") or []
    if named and type(hf).__name__ not in named:
        raise CheckpointError(
            f"config.json names {', '.join(named)}, but transformers builds "
            f"{type(hf).__name__} from it (model_type {raw.get('model_type')!r})"
        )
    hf = hf.to(torch.device(device)).eval().requires_grad_(False)  # type: ignore[arg-type]
    model = TransformersModel(hf, discover(hf), generic_config(hf, architecture))
    offered_hooks(model)
    return model
