"""A deterministic toy tokenizer for tiny-model tests (no weights, no files)."""

from __future__ import annotations

import re


class WordTokenizer:
    """One id per word (with its leading space), grown on demand; ``decode`` for generated ids.

    Ids 0 and 1 are never words: 0 is the placeholder/pad, 1 is free for an end-of-answer id.
    """

    def __init__(self, vocab_size: int = 256) -> None:
        self.vocab_size = vocab_size
        self.vocab: dict[str, int] = {}

    def encode_plain(self, text: str) -> list[int]:
        ids = []
        for piece in re.findall(r"\s*\S+", text):
            if piece not in self.vocab:
                if len(self.vocab) + 2 >= self.vocab_size:
                    raise ValueError("toy vocabulary is full")
                self.vocab[piece] = len(self.vocab) + 2
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return "".join(words.get(i, f" <{i}>") for i in ids)
