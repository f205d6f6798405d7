"""Perplexity scoring of text: sentences mode (each line alone) or stream mode (one carried state).

Every line becomes the token sequence ``[start] + tokens + [eos]`` (start: bos, else eos; either is left
out when the model has none) and every token after the first is scored, so eos is scored like KenLM's
``</s>``. Sentences mode scores each line from a fresh state; lines are read in blocks, sorted by length
into batches of ``batch_size`` rows, and reported in input order. Stream mode concatenates the lines'
sequences (one start symbol at the very beginning) and scores them as one sequence in chunks, the state
carried. Lines too long to tokenise at once arrive in pieces (textio) and score as their own chunked
stream, with the same numbers. Log-probabilities are natural logs; totals add in float64.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import LstmInferError
from .format import CELLS
from .textio import Piece

MODES = ("sentences", "stream")
BLOCK_LINES = 4096  # lines sorted together for batching
BLOCK_TOKENS = 1 << 21  # ... and at most this many tokens, so memory does not grow with line length
STREAM_CHUNK = 2048  # tokens per engine call in stream mode
CHUNK_BYTES = 64 << 20  # cap on one call's input projections: T * B * G * H floats


@dataclass
class LineScore:
    """One line's score. ``tokens`` counts the scored tokens (eos included), ``words`` its words (+ eos)."""

    source: str
    line: int
    log_prob: float = 0.0
    tokens: int = 0
    oov: int = 0
    oov_log_prob: float = 0.0
    words: int = 0
    token_texts: list[str] | None = None
    token_log_probs: list[float] | None = None
    token_oov: list[bool] | None = None
    _in_word: bool = field(default=False, repr=False)

    def as_dict(self) -> dict:
        d = {"source": self.source, "line": self.line, "log_prob": self.log_prob, "tokens": self.tokens,
             "oov": self.oov}
        if self.token_texts is not None:
            d["token_log_probs"] = [{"token": t, "log_prob": lp, "oov": o}
                                    for t, lp, o in zip(self.token_texts, self.token_log_probs, self.token_oov)]
        return d


def _ppl(log_prob: float, n: int) -> float | None:
    if n <= 0:
        return None
    try:
        return math.exp(-log_prob / n)
    except OverflowError:  # binary junk scored per word can exceed e^709
        return math.inf


@dataclass
class ScoreResult:
    """Totals over everything scored (KenLM's summary); ``lines`` in input order when kept."""

    tokens: int = 0
    oov: int = 0
    log_prob: float = 0.0
    oov_log_prob: float = 0.0
    words: int = 0
    line_count: int = 0
    lines: list[LineScore] | None = None

    def add(self, ls: LineScore) -> None:
        self.tokens += ls.tokens
        self.oov += ls.oov
        self.log_prob += ls.log_prob
        self.oov_log_prob += ls.oov_log_prob
        self.words += ls.words
        self.line_count += 1
        if self.lines is not None:
            self.lines.append(ls)

    @property
    def perplexity(self) -> float | None:
        """exp(-log_prob / tokens); None when nothing was scored."""
        return _ppl(self.log_prob, self.tokens)

    @property
    def perplexity_excl_oov(self) -> float | None:
        """Perplexity over the in-vocabulary tokens alone (KenLM's 'Perplexity excluding OOVs')."""
        return _ppl(self.log_prob - self.oov_log_prob, self.tokens - self.oov)

    @property
    def bits_per_token(self) -> float | None:
        return -self.log_prob / self.tokens / math.log(2) if self.tokens else None

    @property
    def word_perplexity(self) -> float | None:
        """exp(-log_prob / words): comparable with word-level models whatever the tokenizer."""
        return _ppl(self.log_prob, self.words)

    def as_dict(self) -> dict:
        d = {"tokens": self.tokens, "oov": self.oov, "log_prob": self.log_prob, "perplexity": self.perplexity,
             "perplexity_excl_oov": self.perplexity_excl_oov, "bits_per_token": self.bits_per_token,
             "words": self.words, "word_perplexity": self.word_perplexity, "lines_scored": self.line_count}
        if self.lines is not None:
            d["lines"] = [ls.as_dict() for ls in self.lines]
        return d


def _count_words(text: str, in_word: bool) -> tuple[int, bool]:
    """Words in a piece of a line, not counting one continued from the previous piece."""
    n = len(text.split())
    if n and in_word and not text[0].isspace():
        n -= 1
    return n, (not text[-1].isspace()) if text else in_word


class Scorer:
    """Scores pieces of text with one model. Holds choices, not state: each call starts afresh."""

    def __init__(self, model, mode: str = "sentences", batch_size: int = 64, per_token: bool = False):
        if mode not in MODES:
            raise LstmInferError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise LstmInferError(f"batch size must be a positive integer, got {batch_size!r}")
        where = model.path or "model"
        if model.embedding is None or model.head_w is None:
            raise LstmInferError(f"{where}: scoring needs a language model with an embedding and an output head")
        if model.tokenizer is None:
            raise LstmInferError(f"{where}: has no tokenizer or vocabulary, so it cannot read text "
                                 "(convert it with --vocab / --tokenizer)")
        self.model, self.mode, self.batch_size, self.per_token = model, mode, batch_size, per_token
        self.tok = model.tokenizer
        self.start, self.eos = self.tok.start_id, self.tok.eos_id
        widest = max(len(ly.dirs) * ly.hidden * CELLS[ly.cell] for ly in model.layers)
        self.chunk_rows = max(64, CHUNK_BYTES // (4 * widest))

    @property
    def word_cut(self) -> bool:
        return self.tok.kind == "word"

    # ------------------------------------------------------------------ entry point
    def score(self, pieces: Iterable[Piece], source: str) -> Iterator[LineScore]:
        """Line scores in input order for the pieces of one source."""
        if self.mode == "stream":
            return self._stream(pieces, source)
        return self._sentences(pieces, source)

    # ------------------------------------------------------------------ shared pieces
    def _tokens(self, text: str, where: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self.tok.encode_oov(text)
        except LstmInferError as err:
            raise LstmInferError(f"{where}: {err}") from None

    def _account(self, ls: LineScore, targets: np.ndarray, oov: np.ndarray, lp: np.ndarray) -> None:
        """Add scored targets to a line; NaN in lp marks a token that was context only."""
        scored = ~np.isnan(lp)
        lp64 = lp[scored].astype(np.float64)
        ls.tokens += int(scored.sum())
        ls.log_prob += float(lp64.sum())
        ls.oov += int(oov[scored].sum())
        ls.oov_log_prob += float(lp64[oov[scored]].sum())
        if self.per_token:
            ls.token_texts = ls.token_texts or []
            ls.token_log_probs = ls.token_log_probs or []
            ls.token_oov = ls.token_oov or []
            ls.token_texts += [self.tok.token_text(int(i)) for i in targets[scored]]
            ls.token_log_probs += [float(x) for x in lp[scored]]
            ls.token_oov += [bool(x) for x in oov[scored]]

    def _piece_tokens(self, ls: LineScore, p: Piece, first_of_stream: bool) -> tuple[np.ndarray, np.ndarray]:
        """A piece's tokens with the start symbol before a stream's first piece and eos after a line's last."""
        ids, oov = self._tokens(p.text, f"{ls.source}:{p.line}")
        n, ls._in_word = _count_words(p.text, ls._in_word)
        ls.words += n
        pre = [self.start] if first_of_stream and self.start is not None else []
        post = [self.eos] if p.last and self.eos is not None else []
        ls.words += len(post)  # the end-of-line symbol counts as a word, as in word-level models
        if pre or post:
            ids = np.concatenate([np.array(pre, np.int64), ids, np.array(post, np.int64)])
            oov = np.concatenate([np.zeros(len(pre), np.bool_), oov, np.zeros(len(post), np.bool_)])
        return ids, oov

    # ------------------------------------------------------------------ stream mode
    def _stream(self, pieces: Iterable[Piece], source: str, fresh_line: bool = False) -> Iterator[LineScore]:
        """Score pieces as one sequence, state carried; pending lines are flushed every STREAM_CHUNK tokens."""
        stream = _Stream(self.model)
        pending: list[tuple[LineScore, np.ndarray, np.ndarray, bool]] = []
        count, first, ls = 0, True, None
        for p in pieces:
            if p.first:
                ls = LineScore(source, p.line)
            ids, oov = self._piece_tokens(ls, p, first)
            first = False
            pending.append((ls, ids, oov, p.last))
            count += len(ids)
            if count >= STREAM_CHUNK:
                yield from self._flush(stream, pending)
                pending, count = [], 0
            if p.last and fresh_line:
                break
        yield from self._flush(stream, pending)

    def _flush(self, stream: _Stream, pending: list) -> Iterator[LineScore]:
        if not pending:
            return
        seq = np.concatenate([ids for _, ids, _, _ in pending])
        lp = stream.feed(seq)
        k = 0
        for ls, ids, oov, last in pending:
            self._account(ls, ids, oov, lp[k:k + len(ids)])
            k += len(ids)
            if last:
                yield ls

    # ------------------------------------------------------------------ sentences mode
    def _sentences(self, pieces: Iterable[Piece], source: str) -> Iterator[LineScore]:
        block: list[tuple[LineScore, np.ndarray, np.ndarray]] = []
        tokens = 0
        it = iter(pieces)
        for p in it:
            if p.first and p.last:
                ls = LineScore(source, p.line)
                ids, oov = self._piece_tokens(ls, p, True)
                block.append((ls, ids, oov))
                tokens += len(ids)
                if len(block) >= BLOCK_LINES or tokens >= BLOCK_TOKENS:
                    yield from self._score_block(block)
                    block, tokens = [], 0
            else:  # a long line: whatever came before it first, then the line as its own stream
                yield from self._score_block(block)
                block = []
                yield from self._stream(_prepend(p, it), source, fresh_line=True)
        yield from self._score_block(block)

    def _score_block(self, block: list) -> Iterator[LineScore]:
        if not block:
            return
        n = np.array([len(ids) - 1 for _, ids, _ in block])
        order = np.argsort(n, kind="stable")
        lps: list[np.ndarray | None] = [None] * len(block)
        s = 0
        while s < len(order):
            # Rows sorted by length; long rows go fewer at a time so the padded (T, rows) ids stay bounded.
            e = min(len(order), s + self.batch_size)
            while e - s > 1 and n[order[e - 1]] * (e - s) > BLOCK_TOKENS:
                e -= 1
            idx, s = order[s:e], e
            T = int(n[idx].max())
            if T <= 0:
                continue
            inputs = np.zeros((T, len(idx)), np.int64)
            targets = np.zeros((T, len(idx)), np.int64)
            for j, i in enumerate(idx):
                ids = block[i][1]
                inputs[: n[i], j] = ids[:-1]
                targets[: n[i], j] = ids[1:]
            lp = self._batch(inputs, targets, np.maximum(n[idx], 0))
            for j, i in enumerate(idx):
                lps[i] = lp[: n[i], j]
        for (ls, ids, oov), lp in zip(block, lps):
            if lp is not None and len(lp):
                self._account(ls, ids[1:], oov[1:], lp)
            yield ls

    def _batch(self, inputs: np.ndarray, targets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """target_log_probs over (T, B), split in time so one call's buffers stay under CHUNK_BYTES."""
        T, B = inputs.shape
        step = max(1, self.chunk_rows // B)
        if T <= step:
            return self.model.target_log_probs(inputs, targets, lengths=lengths)[0]
        out = np.empty((T, B), np.float32)
        state = None
        for s in range(0, T, step):
            e = min(T, s + step)
            ln = np.clip(lengths - s, 0, e - s)
            out[s:e], state = self.model.target_log_probs(inputs[s:e], targets[s:e], state=state, lengths=ln)
        return out


def _prepend(p: Piece, it: Iterator[Piece]) -> Iterator[Piece]:
    # Not a generator with ``yield from it``: when the long line's stream stops early, closing that generator
    # would close ``it`` too, and every line after the long one would be lost.
    return itertools.chain((p,), it)


class _Stream:
    """One row scored in chunks: holds the carried state and the last token (the next chunk's first input)."""

    def __init__(self, model):
        self.model, self.state, self.prev = model, None, None

    def feed(self, toks: np.ndarray) -> np.ndarray:
        """log P(toks[k] | everything before) for each k; NaN for the very first token (context only)."""
        out = np.empty(len(toks), np.float32)
        pos = 0
        if self.prev is None and len(toks):
            out[0], self.prev, pos = np.nan, int(toks[0]), 1
        while pos < len(toks):
            end = min(pos + STREAM_CHUNK, len(toks))
            inputs = np.concatenate([[self.prev], toks[pos:end - 1]])[:, None]
            lp, self.state = self.model.target_log_probs(inputs, toks[pos:end, None], state=self.state)
            out[pos:end] = lp[:, 0]
            self.prev, pos = int(toks[end - 1]), end
        return out


def score_text(model, text_or_lines, mode: str = "sentences", batch_size: int = 64,
               per_token: bool = False, keep_lines: bool = True, source: str = "<text>") -> ScoreResult:
    """Score a string (lines split on \\n) or a list of lines; the Python face of ``lstm-infer score``."""
    from .textio import lines_of, read_pieces

    scorer = Scorer(model, mode, batch_size, per_token)
    result = ScoreResult(lines=[] if keep_lines else None)
    for ls in scorer.score(read_pieces(lines_of(text_or_lines), source, word_cut=scorer.word_cut), source):
        result.add(ls)
    return result
