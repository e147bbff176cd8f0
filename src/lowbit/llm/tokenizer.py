"""Tokenizers: the checkpoint's own (through transformers) when it ships one, else bytes."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255: needs a vocabulary of at least 256."""

    name = "bytes"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        if self.vocab_size < 256:
            raise ValueError(
                f"the byte tokenizer needs vocab_size >= 256, the model has "
                f"{self.vocab_size}; pass --prompt-len without --prompt for random ids"
            )
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(directory))
        self.name = f"hf:{type(self._tok).__name__}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


def load_tokenizer(model: str, vocab_size: int) -> Tokenizer:
    """The checkpoint directory's tokenizer if it has one, else the byte fallback."""
    path = Path(model)
    if path.is_dir() and any((path / f).is_file() for f in TOKENIZER_FILES):
        try:
            return HFTokenizer(path)
        except Exception as e:  # a broken tokenizer must not block speed or size studies
            warnings.warn(
                f"tokenizer in {path} could not be loaded ({type(e).__name__}: {e}); "
                "using the byte-level fallback",
                RuntimeWarning,
                stacklevel=2,
            )
    return ByteTokenizer(vocab_size)


def encode_checked(tok: Tokenizer, text: str, vocab_size: int) -> list[int]:
    ids = tok.encode(text)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"tokenizer {tok.name} produced id {bad[0]} outside the model vocabulary ({vocab_size})"
        )
    return ids
