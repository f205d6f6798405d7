"""Vocabularies for converted models: read them (a file, or a checkpoint's own entries), pick the tokenizer.

A vocabulary is always a list of token strings whose index is the token id (the embedding row).
Accepted sources:

    text file     one token per line, line number = id (a trailing newline is not a token)
    JSON list     ["<unk>", "the", ...]
    JSON object   {"the": 1, ...} token -> id, or {"1": "the", ...} id -> token
    checkpoint    entries named as in VOCAB_KEYS holding any of the above (itos, stoi, word2idx, ...)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lstm_infer.errors import LstmInferError
from lstm_infer.format import TOKENIZERS

# Checkpoint entries that hold a vocabulary, most explicit first.
VOCAB_KEYS = ("itos", "idx2word", "idx_to_word", "id2word", "i2w", "idx2char", "idx_to_char", "int2char",
              "id2token", "idx2token", "stoi", "word2idx", "word_to_idx", "word2id", "w2i", "char2idx",
              "char_to_idx", "char2int", "token2id", "token2idx", "vocab", "vocabulary", "tokens", "chars",
              "dictionary")
# Special tokens looked up by name when not given (word_language_model / PTB / fairseq conventions).
SPECIALS = {"eos": ("<eos>", "</s>"), "bos": ("<s>", "<bos>"), "unk": ("<unk>",)}


def as_token_list(obj: Any, where: str) -> list[str]:
    """A list of tokens (id order) from a list, a token -> id mapping or an id -> token mapping."""
    if isinstance(obj, (list, tuple)):
        if not all(isinstance(t, str) for t in obj):
            raise LstmInferError(f"{where}: the vocabulary list must hold only strings")
        return list(obj)
    if not isinstance(obj, dict) or not obj:
        raise LstmInferError(f"{where}: a vocabulary must be a list of tokens or a token -> id mapping")
    items = list(obj.items())
    if all(isinstance(k, str) and _is_id(v) for k, v in items):
        pairs = [(int(v), k) for k, v in items]  # token -> id
    elif all(_is_id(k) and isinstance(v, str) for k, v in items):
        pairs = [(int(k), v) for k, v in items]  # id -> token (JSON keys are strings of digits)
    else:
        raise LstmInferError(f"{where}: a vocabulary mapping must map tokens to integer ids (or ids to tokens)")
    pairs.sort()
    ids = [i for i, _ in pairs]
    if ids != list(range(len(ids))):
        gap = next((n for n, i in enumerate(ids) if i != n), len(ids))
        raise LstmInferError(f"{where}: vocabulary ids must be exactly 0..{len(ids) - 1} (id {gap} is missing "
                             "or repeated)")
    return [t for _, t in pairs]


def _is_id(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 0
    return isinstance(v, str) and v.isascii() and v.isdigit()


def read_vocab_file(path: str | os.PathLike) -> list[str]:
    """Tokens from a text (one per line) or JSON (list, or token -> id object) vocabulary file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LstmInferError(f"{p}: vocabulary file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise LstmInferError(f"{p}: cannot read the vocabulary file as UTF-8 text ({type(err).__name__})") from None
    return parse_vocab_text(text, str(p))


def parse_vocab_text(text: str, where: str) -> list[str]:
    """A vocabulary file's content: JSON when it parses as JSON (a list or object), else one token per line."""
    text = text.removeprefix("\ufeff")
    stripped = text.strip()
    data = None
    if stripped[:1] in ("[", "{"):
        try:
            data = json.loads(stripped)
        except (ValueError, RecursionError) as err:
            # A char vocabulary may well start with "[" or "{": only a .json file must be JSON.
            if where.lower().endswith(".json"):
                raise LstmInferError(f"{where}: not valid JSON ({str(err).splitlines()[0]})") from None
    if data is not None:
        tokens = as_token_list(data, where)
    else:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        tokens = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
        empty = next((n for n, t in enumerate(tokens) if t == ""), None)
        if empty is not None:
            raise LstmInferError(f"{where}: line {empty + 1} is empty (one token per line; line number = id)")
    if not tokens:
        raise LstmInferError(f"{where}: the vocabulary is empty")
    _no_duplicates(tokens, where)
    return tokens


def _no_duplicates(tokens: list[str], where: str) -> None:
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise LstmInferError(f"{where}: token {t!r} appears twice (ids {seen[t]} and {i})")
        seen[t] = i


def find_vocab(entries: dict, where: str, depth: int = 2) -> list[str] | None:
    """A vocabulary stored next to the weights in a checkpoint dict (searched ``depth`` levels down).

    Several entries must agree (itos and stoi usually do); otherwise the user has to pick with --vocab.
    """
    found: list[tuple[str, list[str]]] = []

    def walk(d: dict, path: str, level: int) -> None:
        for k, v in d.items():
            if not isinstance(k, str):
                continue
            if k in VOCAB_KEYS and isinstance(v, (list, tuple, dict)):
                try:
                    found.append((path + k, as_token_list(v, f"{where} entry '{path + k}'")))
                    continue
                except LstmInferError:
                    pass  # not a vocabulary after all (numbers, a nested record): look inside dicts only
            if isinstance(v, dict) and level < depth:
                walk(v, f"{path}{k}.", level + 1)

    walk(entries, "", 1)
    if not found:
        return None
    first_key, first = found[0]
    for key, other in found[1:]:
        if other != first:
            raise LstmInferError(f"{where}: entries '{first_key}' and '{key}' hold different vocabularies "
                                 "(choose one with --vocab FILE)")
    _no_duplicates(first, f"{where} entry '{first_key}'")
    return first


def resolve_tokenizer(vocab: list[str] | None, vocab_size: int | None, *, kind: str | None,
                      bos: str | None, eos: str | None, unk: str | None, where: str
                      ) -> tuple[dict | None, list[str] | None]:
    """The tokenizer config and the vocabulary to write, from the user's options and what was found.

    ``vocab_size`` is the embedding's row count (None: the model has no embedding). ``kind`` None picks
    "byte" for a 256-row embedding without a vocabulary, else "word" when there is one, else no tokenizer.
    """
    if kind is not None and kind not in TOKENIZERS:
        raise LstmInferError(f"tokenizer {kind!r} is not one of {', '.join(TOKENIZERS)}")
    if vocab_size is None:
        if vocab is not None or kind is not None:
            raise LstmInferError(f"{where}: the model has no embedding, so it takes vectors, not tokens (drop "
                                 "--vocab / --tokenizer; if the head's weight is the embedding saved once, "
                                 "name it with --embedding NAME)")
        if any(x is not None for x in (bos, eos, unk)):
            raise LstmInferError(f"{where}: --bos / --eos / --unk need a model with an embedding and a vocabulary")
        return None, None
    if vocab is not None and len(vocab) != vocab_size:
        raise LstmInferError(f"{where}: the vocabulary has {len(vocab)} tokens but the embedding has "
                             f"{vocab_size} rows")
    if vocab is None and kind in (None, "byte") and vocab_size == 256:
        kind, vocab = "byte", [chr(i) for i in range(256)]
    if kind is None:
        kind = "word" if vocab is not None else None
    if kind is None:
        if any(x is not None for x in (bos, eos, unk)):
            raise LstmInferError(f"{where}: --bos / --eos / --unk need a vocabulary (--vocab FILE)")
        return None, None
    if vocab is None:
        need = "exactly 256 rows or --vocab FILE" if kind == "byte" else "--vocab FILE"
        raise LstmInferError(f"{where}: a {kind} tokenizer needs a vocabulary; the checkpoint has none and the "
                             f"embedding has {vocab_size} rows (needs {need})")
    known = set(vocab)
    tok = {"kind": kind}
    for name, given in (("bos", bos), ("eos", eos), ("unk", unk)):
        if given is not None and given not in known:
            raise LstmInferError(f"{where}: {name} token {given!r} is not in the vocabulary")
        tok[name] = given if given is not None else next((t for t in SPECIALS[name] if t in known), None)
    return tok, vocab
