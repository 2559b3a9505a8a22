"""The model's tokenizer, through ``transformers.AutoTokenizer`` (fast, with offsets).

Prompts are encoded with special tokens exactly as the model expects (BOS for
Llama and Gemma tokenizers that add one; nothing for GPT-2), so position ``i``
here is position ``i`` in every activation the runtime returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoding:
    ids: list[int]
    offsets: list[tuple[int, int]] | None  # character range of each token; None if unknown
    special: list[bool]  # whether each token is a special token (BOS, ...)


#: Files any one of which makes a folder's tokenizer loadable.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class TokenizerError(ValueError):
    """A checkpoint whose tokenizer cannot be loaded; the message says which file is missing."""


class Tokenizer:
    def __init__(self, hf: PreTrainedTokenizerBase) -> None:
        self.hf = hf

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        path = Path(folder)
        if path.is_dir() and not any((path / name).exists() for name in TOKENIZER_FILES):
            raise TokenizerError(
                f"{path} has no tokenizer: it needs tokenizer.json (a fast tokenizer; "
                f"or {' / '.join(TOKENIZER_FILES[1:])}). Save one next to the weights with "
                f"AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained({str(path)!r})"
            )
        return cls(AutoTokenizer.from_pretrained(str(folder)))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def eos_token_id(self) -> int | None:
        eos = self.hf.eos_token_id
        return None if eos is None else int(eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        is_fast = bool(getattr(self.hf, "is_fast", False))
        out = self.hf(
            text,
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=is_fast,
            return_special_tokens_mask=True,
        )
        ids = list(out["input_ids"])
        offsets = [tuple(o) for o in out["offset_mapping"]] if is_fast else None
        special = [bool(s) for s in out["special_tokens_mask"]]
        return Encoding(ids=ids, offsets=offsets, special=special)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token decoded on its own (readable axis labels, not raw BPE symbols)."""
        return [str(self.hf.decode([i])) for i in ids]
