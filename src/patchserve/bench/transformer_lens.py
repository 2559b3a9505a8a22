"""Load a local checkpoint into TransformerLens 4.x (``TransformerBridge``), offline."""

from __future__ import annotations

from pathlib import Path

import torch


def load_hooked_transformer(
    checkpoint: Path, device: str = "cpu", dtype: torch.dtype = torch.float32
):
    import transformers as tf
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer_file = checkpoint / "tokenizer.json"
    if tokenizer_file.exists():
        tokenizer = tf.AutoTokenizer.from_pretrained(checkpoint)
    else:  # random benchmark checkpoints carry no tokenizer; the bridge only needs one object
        vocab = {"<unk>": 0}
        tokenizer = tf.PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        )
    bridge = TransformerBridge.boot_transformers(
        str(checkpoint), device=device, dtype=dtype, tokenizer=tokenizer
    )
    return bridge.eval()
