"""Reading text for scoring: lines as bounded pieces, strict or lenient UTF-8, errors that name file and line.

A line is what lies between two ``\\n`` bytes; a ``\\r`` right before the ``\\n`` is dropped (CRLF files score
as LF files). A line longer than ``max_piece`` bytes arrives in several pieces, each cut where the
tokenizer would cut anyway (on whitespace for word models, on a character boundary otherwise), so a
50 MB line never needs 50 MB of token ids at once and scores exactly as if it were read whole.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import LstmInferError
from .tokenizer import utf8_bytes

MAX_PIECE = 1 << 20
_ASCII_SPACE = b" \t\x0b\x0c\r"


@dataclass
class Piece:
    line: int  # 1-based line number in its source
    text: str
    first: bool  # starts its line
    last: bool  # ends its line


def _cut(raw: bytes, word_cut: bool) -> int:
    """Where to split a partial line so no character (or word, with ``word_cut``) is broken."""
    if word_cut:  # no space: 0, so the caller reads on (a word is never split)
        return max(raw.rfind(bytes([c])) for c in _ASCII_SPACE) + 1
    k = len(raw)
    # Step back over UTF-8 continuation bytes (10xxxxxx) to the lead byte of the last character.
    back = 0
    while back < 4 and k - back - 1 >= 0 and raw[k - back - 1] & 0xC0 == 0x80:
        back += 1
    if k - back - 1 >= 0 and raw[k - back - 1] >= 0xC0:
        lead = raw[k - back - 1]
        need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if back + 1 < need:
            return k - back - 1
    return k


def _decode(raw: bytes, name: str, line: int, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError as err:
        raise LstmInferError(
            f"{name}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
            "use --encoding-errors replace to score it anyway") from None


def read_pieces(f: BinaryIO, name: str, *, errors: str = "strict", word_cut: bool = False,
                max_piece: int = MAX_PIECE, progress: Progress | None = None, first_line: int = 1) -> Iterator[Piece]:
    """Yield the pieces of every line of a binary stream, in order; ``first_line`` numbers the stream's first line."""
    line, carry, first = first_line, b"", True
    while True:
        new = f.readline(max_piece)
        if progress is not None:
            progress.advance(len(new))
        if not new:
            if carry or not first:
                yield Piece(line, _decode(carry, name, line, errors), first, True)
            return
        raw = carry + new
        if raw.endswith(b"\n"):
            body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            yield Piece(line, _decode(body, name, line, errors), first, True)
            line, carry, first = line + 1, b"", True
            continue
        # Short read without \n: end of input comes next. Otherwise cut where no character (word) breaks;
        # a trailing \r waits, it may be half of a CRLF.
        k = _cut(raw, word_cut) if len(new) == max_piece else 0
        if k == len(raw) and raw.endswith(b"\r"):
            k -= 1
        if k == 0:
            if len(raw) > 64 * max_piece:
                raise LstmInferError(f"{name}:{line}: a single token longer than {64 * max_piece} bytes")
            carry = raw
            continue
        yield Piece(line, _decode(raw[:k], name, line, errors), first, False)
        carry, first = raw[k:], False


def open_input(path: str) -> tuple[BinaryIO, str, int | None]:
    """(binary stream, display name, size in bytes or None). ``-`` is stdin."""
    if path == "-":
        return sys.stdin.buffer, "<stdin>", None
    try:
        f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise LstmInferError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LstmInferError(f"{path}: is a directory, not a text file") from None
    except OSError as err:
        raise LstmInferError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        size = os.fstat(f.fileno()).st_size
    except OSError:
        size = None
    return f, path, size


def lines_of(text: str | list[str] | tuple[str, ...]) -> io.BytesIO:
    """In-memory text (one string, or a list of lines) as a binary stream for read_pieces."""
    if not isinstance(text, str) and not (isinstance(text, (list, tuple)) and all(isinstance(s, str) for s in text)):
        raise LstmInferError(f"text must be a string or a list of strings, got {type(text).__name__}")
    return io.BytesIO(utf8_bytes(text if isinstance(text, str) else "".join(s + "\n" for s in text)))


class Progress:
    """A one-line progress report on stderr, redrawn at most a few times a second."""

    def __init__(self, total: int | None, enabled: bool):
        self.total, self.enabled = total, enabled
        self.done, self.tokens = 0, 0
        self.t0 = self.last = time.perf_counter()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.enabled and now - self.last > 0.25:
            self.last = now
            rate = self.tokens / max(now - self.t0, 1e-9)
            pct = f"{100 * self.done / self.total:5.1f}% " if self.total else ""
            sys.stderr.write(f"\r{pct}{self.done / 1e6:,.1f} MB  {rate:,.0f} tokens/s ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.last > self.t0:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()
