"""Text <-> token ids for the three tokenizer kinds a model directory can declare.

word: whitespace-separated words, unknown words map to the unk token (or are an error without one)
char: one token per Unicode code point, unknown ones map to unk
byte: the UTF-8 bytes of the text, ids 0..255; nothing is ever out of vocabulary
"""

from __future__ import annotations

import numpy as np

from .errors import LstmInferError


class Tokenizer:
    def __init__(self, kind: str, vocab: list[str], bos: str | None, eos: str | None, unk: str | None):
        self.kind = kind
        self.vocab = vocab
        self.index = {tok: i for i, tok in enumerate(vocab)}
        self.bos_id = self.index[bos] if bos is not None else None
        self.eos_id = self.index[eos] if eos is not None else None
        self.unk_id = self.index[unk] if unk is not None else None

    @classmethod
    def from_config(cls, tok: dict, vocab: list[str]) -> Tokenizer:
        return cls(tok["kind"], vocab, tok.get("bos"), tok.get("eos"), tok.get("unk"))

    @property
    def start_id(self) -> int | None:
        """The symbol a fresh sequence is conditioned on: bos, else eos (word_language_model style)."""
        return self.bos_id if self.bos_id is not None else self.eos_id

    def encode(self, text: str) -> tuple[np.ndarray, int]:
        """Token ids (int64) and the number of out-of-vocabulary tokens mapped to unk."""
        ids, oov = self.encode_oov(text)
        return ids, int(oov.sum())

    def encode_oov(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64) and a bool mask of the tokens that were out of vocabulary (mapped to unk)."""
        if self.kind == "byte":
            ids = np.frombuffer(utf8_bytes(text), np.uint8).astype(np.int64)
            return ids, np.zeros(len(ids), np.bool_)
        pieces = text.split() if self.kind == "word" else list(text)
        ids = np.empty(len(pieces), np.int64)
        oov = np.zeros(len(pieces), np.bool_)
        get = self.index.get
        for k, p in enumerate(pieces):
            i = get(p)
            if i is None:
                if self.unk_id is None:
                    raise LstmInferError(f"token {p!r} is not in the vocabulary and the model has no unk token")
                i, oov[k] = self.unk_id, True
            ids[k] = i
        return ids, oov

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            raw = bytearray()
            for i in ids:
                raw += bytes([i]) if i < 256 else self.vocab[i].encode()
            return raw.decode("utf-8", "replace")
        sep = " " if self.kind == "word" else ""
        return sep.join(self.vocab[i] for i in ids)

    def token_text(self, i: int) -> str:
        """A printable form of one token, for per-token output."""
        if self.kind == "byte" and i < 256:
            return chr(i) if 32 <= i < 127 else f"<0x{i:02X}>"
        return self.vocab[i]


def utf8_bytes(text: str) -> bytes:
    """UTF-8 bytes of a text; surrogate-escaped bytes (U+DC80..U+DCFF) come back as the bytes they stand for."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as err:  # a lone surrogate elsewhere has no UTF-8 form
        raise LstmInferError(f"text holds a lone surrogate U+{ord(text[err.start]):04X} at character {err.start}, "
                             "which has no UTF-8 bytes") from None
