"""Tiny random checkpoints of architectures with no native family (the generic runtime).

Built like ``checkpoints.py``'s (``from_config`` + ``save_pretrained`` next to the same
trained tokenizer), from their own table: none of these is in ``CONFIGS``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import transformers as tf

from checkpoints import COMMON, LLAMA_SHAPE, build_tokenizer, randomise

GENERIC_CONFIGS: dict[str, Callable[[], tf.PretrainedConfig]] = {
    # GPT-2-like with multi-query attention and learned positions
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(
        **COMMON, n_embd=64, n_layer=3, n_head=4, n_positions=256, multi_query=True
    ),
    # Llama-like (Baidu, 2025)
    "ernie4_5": lambda: tf.Ernie4_5Config(**COMMON, **LLAMA_SHAPE),
    # norms after each branch: attn_out / mlp_out are not module outputs, so refused
    "glm4": lambda: tf.Glm4Config(**COMMON, **LLAMA_SHAPE),
    # xIELU activation, QK norm (Swiss AI, 2025)
    "apertus": lambda: tf.ApertusConfig(**COMMON, **LLAMA_SHAPE),
    # sliding-window layers (a window shorter than the prompts) and post-branch norms
    "exaone4": lambda: tf.Exaone4Config(
        **COMMON,
        **{**LLAMA_SHAPE, "num_hidden_layers": 4},
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    # mixture of experts, attention sinks, sliding windows (OpenAI, 2025)
    "gpt_oss": lambda: tf.GptOssConfig(
        **COMMON,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        max_position_embeddings=256,
    ),
}
GENERIC = tuple(GENERIC_CONFIGS)


def build_generic_checkpoint(name: str, root: Path, seed: int = 0) -> Path:
    """Save a random ``name`` checkpoint + tokenizer under ``root/name``; return the folder."""
    folder = root / name
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, add_bos=False)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(GENERIC_CONFIGS[name]())
    randomise(model, seed)
    model.save_pretrained(folder)
    return folder
