"""Text generation over a Model: greedy search, beam search and sampling (issue 6).

A sequence is the model's start symbol (bos, else eos; none without a tokenizer), then the prompt's
tokens, then the new tokens. The prompt runs through the batched engine once ("prefill"); new tokens
come from the compiled loops in decode_kernels.py, or, for stacks those loops do not cover (custom
activations, peepholes, clip, coupled gates, mixed layers), from a slower loop over the layers' kernels
(``Model._step_layers``) that chooses tokens with the same compiled pickers. ``Model.step`` runs on the
compiled network too where it covers the model (``step`` below).

The compiled path re-lays the recurrent weights once per Model (W_ih and W_hh side by side,
interleaved per hidden unit, see decode_kernels) and caches that copy on the Model: extra memory equal
to the recurrent weights, and the head in panels of 64 tokens when that copy is at most TABLE_BYTES; the
embedding is used in place. Layer 0 reads its input projection of every token (V x G*H floats) from a
table: an LSTM's is the scoring path's own (recurrent.TokenTable), any other cell's one of the decoder's;
filled whole when it takes at most TABLE_BYTES, a row per new token up to TABLE_ROWS_BYTES, none above.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import decode_kernels as dk
from . import fused, gang
from .errors import LstmInferError
from .format import CELLS
from .layers import zero_state
from .simd import LANES

F32 = np.float32
METHODS = ("greedy", "beam", "sample")
ENGINES = ("auto", "compiled", "step")
CELL_CODES = {"lstm": 0, "gru": 1, "rnn": 2}
# Layer 0's input projection of every token (V, G*H floats) is precomputed when it takes at most this:
# each token then reads one row of it instead of all of W_ih (13% of the bytes per token of a
# V10k E650 H650 L2 model, for a 104 MB table).
TABLE_BYTES = 128 << 20
# Larger tables, up to this size, start empty and fill a row the first time its token comes (dk.fill_rows):
# the 1500-unit model's 240 MB table built whole is a 78 GFLOP GEMM (0.42-1.18 s in three runs) that a
# short generate would pay; filled on demand it took a greedy token from 4.46 to 4.06 ms and a beam-5 step
# from 5.96 to 4.23 (16 MB less W_ih per token; 2 threads, one process, alternated).
TABLE_ROWS_BYTES = 256 << 20


@dataclass
class Hypothesis:
    """One continuation. ``ids`` and ``text`` hold only the new tokens, without the eos that ended it;
    ``log_prob`` is their summed natural-log probability under the model (the eos included when
    ``ended``); ``score`` = log_prob / length ** length_penalty, the length counting that eos."""

    text: str | None
    ids: list[int]
    log_prob: float
    score: float
    ended: bool


@dataclass(frozen=True)
class Options:
    """Decoding options, as generate() documents them; ``check`` raises a one-line error for a bad one."""

    method: str = "greedy"
    max_new_tokens: int = 100
    min_new_tokens: int = 0
    beam_size: int = 5
    num_hypotheses: int = 1
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    engine: str = "auto"

    def check(self) -> Options:
        def integer(name: str, lo: int, hi: float = math.inf) -> int:
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
                bound = f"in [{lo}, {hi}]" if hi != math.inf else f">= {lo}"
                raise LstmInferError(f"{name} must be an integer {bound}, got {v!r}")
            return int(v)

        def number(name: str) -> float:
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating, np.integer)) or isinstance(v, bool) or not math.isfinite(v):
                raise LstmInferError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        if self.method not in METHODS:
            raise LstmInferError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.engine not in ENGINES:
            raise LstmInferError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        integer("max_new_tokens", 1)
        integer("min_new_tokens", 0, self.max_new_tokens)
        beam = integer("beam_size", 1)
        n = integer("num_hypotheses", 1)
        number("length_penalty")
        integer("top_k", 0)
        top_p, temperature = number("top_p"), number("temperature")
        if not 0 < top_p <= 1:
            raise LstmInferError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.method == "sample" and temperature <= 0:
            raise LstmInferError(f"temperature must be > 0 for sampling, got {self.temperature!r}")
        if self.method == "beam" and n > beam:
            raise LstmInferError(f"num_hypotheses ({n}) cannot exceed beam_size ({beam})")
        if self.method == "greedy" and n != 1:
            raise LstmInferError("greedy search gives one hypothesis: num_hypotheses must be 1 (or use sample/beam)")
        if self.seed is not None:
            integer("seed", 0)
        if not isinstance(self.stop_at_eos, (bool, np.bool_)):
            raise LstmInferError(f"stop_at_eos must be true or false, got {self.stop_at_eos!r}")
        return self


def _options(kw: dict) -> Options:
    unknown = sorted(set(kw) - set(Options.__dataclass_fields__))
    if unknown:
        raise LstmInferError(f"unknown decoding option(s): {', '.join(unknown)}")
    return Options(**kw).check()


# --------------------------------------------------------------------------- the model, re-laid once

def _where(model) -> str:
    return str(model.path) if model.path is not None else "model"


def _check_model(model) -> None:
    if model.embedding is None or model.head_w is None:
        raise LstmInferError(f"{_where(model)}: generation needs a model with an embedding and an output head")
    for li, lc in enumerate(model.config["layers"]):
        if lc["direction"] != "forward":
            raise LstmInferError(f"{_where(model)}: layer {li} is {lc['direction']}: only a stack of forward "
                                 "layers can generate text left to right")
    if model.head_w.shape[0] != model.vocab_size:
        raise LstmInferError(f"{_where(model)}: the head has {model.head_w.shape[0]} outputs but the embedding "
                             f"{model.vocab_size} rows: generated tokens could not be fed back")


def _not_compiled(model) -> str | None:
    """Why the compiled loops cannot run this model (None: they can)."""
    if not model._uniform:
        return "its layers differ in cell type or size"
    for li, (ly, lc) in enumerate(zip(model.layers, model.config["layers"])):
        d = ly.dirs[0]
        relu_rnn = ly.cell == "rnn" and int(d.codes[0]) == 2
        if lc["peepholes"] or lc["clip"] is not None or lc["input_forget"] or not (d.standard or relu_rnn):
            return f"layer {li} uses peepholes, clip, coupled gates or custom activations"
    return None


def _build_net(model) -> tuple:
    """The ``net`` tuple of decode_kernels: recurrent weights per layer in one flat copy, and layer 0's input
    projection of every token: whole up to TABLE_BYTES (or when the scoring table has its transpose, which
    only TokenTable.fill keeps up to date), filled on demand up to TABLE_ROWS_BYTES."""
    layers = model.layers
    cell = layers[0].cell
    G, H, P = CELLS[cell], layers[0].hidden, layers[0].out
    dirs = [ly.dirs[0] for ly in layers]
    bias = np.stack([np.asarray(d.bias).reshape(G, H) for d in dirs])[:, None]
    V = model.vocab_size
    w_t = np.zeros((0, 0), F32)
    shared = model._token_table() if V * G * H * 4 <= TABLE_ROWS_BYTES else None
    if shared is not None:  # scoring's table (an LSTM's): the same rows, filled by the same kernel
        if V * G * H * 4 <= TABLE_BYTES or shared.cols is not None:  # cols: only TokenTable.fill writes them
            shared.fill(np.arange(V), model.workers)
        else:
            w_t = shared.weights()
        table, have = shared.rows.reshape(V, G, H), shared.have
    elif V * G * H * 4 <= TABLE_BYTES:
        gx = np.matmul(np.asarray(model.embedding), np.asarray(dirs[0].w_ih).T) + dirs[0].bias  # (V, G*H)
        table, have = gx.reshape(V, G, H), np.ones(V, np.bool_)
    elif V * G * H * 4 <= TABLE_ROWS_BYTES:  # rows on demand (dk.fill_rows); calloc'd pages until then
        table, have, w_t = np.zeros((V, G, H), F32), np.zeros(V, np.bool_), fused.tokens_weights(dirs[0].w_ih)
    else:
        table, have = np.zeros((0, G, H), F32), np.zeros(0, np.bool_)
    proj = dirs[0].w_hr is not None
    # A plain LSTM stores each layer transposed in panels of 16 units, (Hp/16, I + P, 4 * 16) with Hp = H
    # rounded up to 16 and a panel's row k holding its units' four gates (dk.lstm_cells_t); every other
    # cell (H, G, I + P).
    transposed = cell == "lstm" and not proj
    Hp = -(-H // LANES) * LANES
    flat, offs, isz = [], [0], []
    for li, d in enumerate(dirs):
        w_ih = np.asarray(d.w_ih).reshape(G, H, -1)[:, :, : 0 if li == 0 and len(table) else None]
        w = np.concatenate([w_ih, np.asarray(d.w_hh).reshape(G, H, P)], axis=2)  # (G, H, K)
        if transposed:
            w = fused.row_panels(w.reshape(G * H, -1))  # (Hp/16, K, G * 16)
        else:
            w = w.transpose(1, 0, 2)
        flat.append(np.ascontiguousarray(w, F32).reshape(-1))
        offs.append(offs[-1] + flat[-1].size)
        isz.append(w_ih.shape[2])
    b_hn = np.stack([np.zeros(H) if d.b_hn is None else d.b_hn for d in dirs])
    w_hr = np.stack([d.w_hr for d in dirs]) if proj else np.zeros((len(dirs), 0, 0))
    flags = np.array([[int(ly.lbr), int(ly.dirs[0].codes[0]) if cell == "rnn" else 0] for ly in layers], np.int64)
    K, Fh = model.head_w.shape
    head_b = np.zeros(K) if model.head_b is None else model.head_b
    if K * Fh * 4 <= TABLE_BYTES:  # the head again in panels of 64 tokens (dk.head_blocks)
        Kp = -(-K // 64) * 64
        hw = np.zeros((Kp, Fh), F32)
        hw[:K] = model.head_w
        head_t = hw.reshape(Kp // 64, 64, Fh).transpose(0, 2, 1)
    else:
        head_t = np.zeros((0, 0, 64), F32)
    c = lambda a: np.ascontiguousarray(a, F32)  # noqa: E731
    return (CELL_CODES[cell], flags, np.concatenate(flat), np.array(offs, np.int64), np.array(isz, np.int64),
            c(bias), c(table), c(b_hn), c(w_hr), np.asarray(model.embedding), np.asarray(model.head_w),
            np.array(head_b, F32), Hp if transposed else 0, c(head_t), have, w_t)


def _net(model, engine: str) -> tuple | None:
    """The compiled network for this model, built once and cached on it; None: use Model._step_layers."""
    if engine == "step":
        return None
    cached = getattr(model, "_decode_net", None)
    if cached is None:
        why = _not_compiled(model)
        cached = (None, why) if why else (_build_net(model), None)
        model._decode_net = cached
    net, why = cached
    if net is None and engine == "compiled":
        raise LstmInferError(f"{_where(model)}: the compiled decoder does not cover this model: {why}")
    return net


GANG_MIN_STEPS = 8  # decoding runs on a gang (dk.decode_rows_gang) from this many steps per call


def _gang_fits(model, net: tuple, steps: int) -> bool:
    """Whether advance() runs on a gang: a plain LSTM in panels with the head in panels, more than one
    thread, and enough steps to pay for waking the pool (20-50 us)."""
    return model.threads > 1 and net[12] > 0 and net[13].shape[0] > 0 and steps >= GANG_MIN_STEPS


def _blocks(model, k: int) -> int:
    return max(1, min(k, 4 * model.threads))


def _head_scratch(model, rows: int, nblk: int) -> tuple:
    """A gang's shared head scratch for ``rows`` rows: logits (rows, V), bmax, bsum (rows, nblk), acc."""
    return (np.empty((rows, model.vocab_size), F32), np.empty((rows, nblk), F32), np.empty((rows, nblk), F32),
            np.empty((nblk, max(rows, 5), 64), F32))


def step(model, ids: np.ndarray, state) -> tuple | None:
    """Model.step on the compiled decoder's network (built once per model, as generate builds it), or None
    where that does not cover the model: one compiled call for all layers and the head. Through the layers'
    path (Model._step_layers: two threadpoolctl limits, a parallel region per layer and for the gather, the
    head's GEMM and log-softmax) a batch-1 step took, 2 threads, us: bundled 236, char 473, medium 2884; here
    108, 168, 1040 (one process, alternated)."""
    try:
        _check_model(model)  # a bidirectional stack, or a head that is not the vocabulary: the layers' path
    except LstmInferError:
        return None
    net = _net(model, "auto")
    if net is None:
        return None
    B = len(ids)
    buf = _Buffers(model, model._state_in(state, B), B)
    lp = np.empty((B, model.vocab_size), F32)
    with model._kernel_launches():
        dk.step_log_probs(net, buf.h, buf.c, buf.scratch, ids, B, _blocks(model, model.vocab_size), lp)
    lstm = model.layers[0].cell == "lstm"
    return lp, model._state_out([(buf.h[1, l, :B], buf.c[1, l, :B] if lstm else None)
                                 for l in range(len(model.layers))])


# --------------------------------------------------------------------------- prompts and prefill

def _start_eos(model) -> tuple[int | None, int | None]:
    tok = model.tokenizer
    return (None, None) if tok is None else (tok.start_id, tok.eos_id)


def _sequences(model, prompts: list[np.ndarray]) -> list[np.ndarray]:
    start, _ = _start_eos(model)
    seqs = []
    for p in prompts:
        seq = p if start is None else np.concatenate([[start], p]).astype(np.int64)
        if seq.size == 0:
            raise LstmInferError(f"{_where(model)}: an empty prompt needs a start symbol (bos or eos) and "
                                 "this model has none: give at least one token")
        seqs.append(seq)
    return seqs


def _prefill(model, seqs: list[np.ndarray]) -> tuple[list, np.ndarray]:
    """Run every sequence but its last token: per-layer states [(h (B, P), c (B, H) | None)], last tokens."""
    lengths = np.array([len(s) - 1 for s in seqs], np.int64)
    last = np.array([s[-1] for s in seqs], np.int64)
    T = int(lengths.max())
    if T == 0:
        return zero_state(model.layers, len(seqs)), last
    ids = np.zeros((T, len(seqs)), np.int64)
    for b, s in enumerate(seqs):
        ids[: len(s) - 1, b] = s[:-1]
    _, st = model._forward(model._embed(ids), None, lengths)
    return st, last


def _take(state: tuple, rows: np.ndarray) -> tuple:
    """Model.step state with batch rows ``rows`` (the beams' or samples' parents)."""
    h, c = state
    if isinstance(h, np.ndarray):
        return h[:, rows], None if c is None else c[:, rows]
    pick = lambda xs: None if xs is None else [None if x is None else x[rows] for x in xs]
    return pick(h), pick(c)


class _Buffers:
    """The compiled loops' double-buffered state, rows [0, B) filled from a prefill."""

    def __init__(self, model, st: list, rows: int):
        L, ly = len(model.layers), model.layers[0]
        R = max(rows, st[0][0].shape[0])
        self.h = np.zeros((2, L, R, ly.out), F32)
        self.c = np.zeros((2, L, R, ly.hidden) if ly.cell == "lstm" else (2, L, 1, 1), F32)
        self.scratch = np.zeros((3, R, ly.hidden), F32)
        for l, (h, c) in enumerate(st):
            self.h[0, l, : h.shape[0]] = h
            if c is not None:
                self.c[0, l, : c.shape[0]] = c


# --------------------------------------------------------------------------- greedy and sampling rows

class _Rows:
    """R rows of greedy or sampled decoding; row r continues prefilled sequence parent[r].

    ``advance(k)`` runs up to k more steps (compiled, or through Model._step_layers); out_ids / out_lp (R, max)
    collect each row's tokens and log-probs.
    """

    def __init__(self, model, opts: Options, seqs: list[np.ndarray], parent: np.ndarray):
        self.model, self.opts = model, opts
        self.net = _net(model, opts.engine)
        _, eos = _start_eos(model)
        self.eos = -1 if eos is None else eos
        st, last = _prefill(model, seqs)
        R = len(parent)
        self.rng = np.random.default_rng(opts.seed)
        self.tok = last[parent].copy()
        self.par = parent.astype(np.int64).copy()
        self.done = np.zeros(R, np.bool_)
        self.out_ids = np.zeros((R, opts.max_new_tokens), np.int64)
        self.out_lp = np.zeros((R, opts.max_new_tokens), np.float64)
        self.t = 0
        if self.net is not None:
            self.buf, self.cur = _Buffers(model, st, R), 0
        else:
            self.state = _take(model._state_out(st), self.par)
            self.e, self.idx = np.empty(model.vocab_size, F32), np.empty(model.vocab_size, np.int64)

    @property
    def finished(self) -> bool:
        return self.t >= self.opts.max_new_tokens or bool(self.done.all())

    def _advance_gang(self, steps: int, common: tuple) -> None:
        """advance() on the model's worker threads as a gang (dk.decode_rows_gang)."""
        m, b, net = self.model, self.buf, self.net
        R, L, members = len(self.tok), b.h.shape[1], m.threads
        nblk = _blocks(m, m.vocab_size)
        shared = (*_head_scratch(m, R, nblk), np.zeros(steps, np.int64), gang.new_counters(steps * (L + 2), members))
        result = []
        dk.fill_rows(net, self.tok, R)  # the first step's rows: the members only read the table

        def member(me: int, members: int) -> None:
            r = dk.decode_rows_gang(net, b.h, b.c, self.cur, self.tok, self.par, R, self.t, steps, nblk, *common,
                                    self.done, self.out_ids, self.out_lp, *shared, me, members)
            if me == 0:
                result.append(r)

        m.workers.gang(member, members)
        self.t, self.cur = result[0]

    def advance(self, steps: int) -> None:
        o, m = self.opts, self.model
        steps = min(steps, o.max_new_tokens - self.t)
        common = (o.min_new_tokens, self.eos, o.stop_at_eos, o.method == "sample", o.temperature, o.top_k, o.top_p,
                  self.rng)
        R = len(self.tok)
        if self.net is not None and _gang_fits(m, self.net, steps):
            self._advance_gang(steps, common)
            return
        if self.net is not None:
            b = self.buf
            with m._kernel_launches():
                self.t, self.cur = dk.decode_rows(self.net, b.h, b.c, b.scratch, self.cur, self.tok, self.par, R,
                                                  self.t, steps, _blocks(m, m.vocab_size), *common, self.done,
                                                  self.out_ids, self.out_lp)
            return
        zero = np.zeros(R)
        for _ in range(steps):
            lp, self.state = m._step_layers(self.tok, self.state)
            all_done = dk.pick_rows(lp, zero, R, self.t, *common, self.done, self.tok, self.out_ids, self.out_lp,
                                    self.e, self.idx)
            self.t += 1
            if all_done:
                break

    def hypothesis(self, r: int) -> Hypothesis:
        ids = self.out_ids[r, : self.t]
        n = len(ids)
        if self.done[r]:
            n = int(np.argmax(ids == self.eos))
        return _hypothesis(self.model, ids[:n], float(self.out_lp[r, : n + self.done[r]].sum()),
                           bool(self.done[r]), self.opts.length_penalty)


def _hypothesis(model, ids: np.ndarray, log_prob: float, ended: bool, alpha: float, score: float | None = None):
    ids = [int(i) for i in ids]
    length = len(ids) + int(ended)
    if score is None:
        score = log_prob / length ** alpha if length else log_prob
    text = model.tokenizer.decode(ids) if model.tokenizer is not None else None
    return Hypothesis(text, ids, log_prob, float(score), ended)


# --------------------------------------------------------------------------- beam search

def _beam_gang(model, net: tuple, buf: _Buffers, tok0: int, common: tuple, hist: np.ndarray, back: np.ndarray,
               fin: tuple) -> None:
    """dk.beam_search on the model's worker threads as a gang (dk.beam_search_gang)."""
    K, T, nblk = common[0], common[1], common[-1]
    L, members = buf.h.shape[1], model.threads
    tok, par = np.zeros(K, np.int64), np.zeros(K, np.int64)
    tok[0] = tok0  # before the members start: none of them writes shared state before the first step ends
    dk.fill_rows(net, tok, 1)
    shared = (tok, par, np.zeros(K), *_head_scratch(model, K, nblk), np.empty((nblk, 2 * K)),
              np.empty((nblk, 2 * K), np.int64), np.empty(nblk, np.int64), np.zeros((T, 2), np.int64),
              gang.new_counters(T * (L + 3), members))
    model.workers.gang(lambda me, members: dk.beam_search_gang(net, buf.h, buf.c, 0, *common, hist, back, *fin,
                                                              *shared, me, members), members)


def _beam(model, opts: Options, seq: np.ndarray) -> list[Hypothesis]:
    net = _net(model, opts.engine)
    _, eos = _start_eos(model)
    eos = -1 if eos is None else eos
    K, N, T, alpha = opts.beam_size, opts.num_hypotheses, opts.max_new_tokens, float(opts.length_penalty)
    st, last = _prefill(model, [seq])
    hist, back = np.zeros((T, K), np.int64), np.zeros((T, K), np.int64)
    fin = (np.zeros(N), np.zeros(N), np.zeros(N, np.int64), np.zeros(N, np.int64), np.zeros(N, np.bool_),
           np.zeros(1, np.int64))
    common = (K, T, opts.min_new_tokens, eos, opts.stop_at_eos, alpha, _blocks(model, model.vocab_size))
    if net is not None:
        buf = _Buffers(model, st, K)
        if _gang_fits(model, net, T):
            _beam_gang(model, net, buf, int(last[0]), common, hist, back, fin)
        else:
            with model._kernel_launches():
                dk.beam_search(net, buf.h, buf.c, buf.scratch, 0, int(last[0]), *common, hist, back, *fin)
    else:
        state, live = model._state_out(st), np.zeros(K)
        tok, par, n = last[:1], np.zeros(1, np.int64), 1
        for t in range(T):
            lp, state = model._step_layers(tok, _take(state, par))
            n, over = dk.beam_update(lp, np.zeros(n), live, n, t, *common, hist, back, *fin)
            if over:
                break
            tok, par = hist[t, :n].copy(), back[t, :n].copy()
    score, log_prob, step, slot, ended, count = fin
    out = []
    for i in range(int(count[0])):
        t = int(step[i]) - int(ended[i])  # an eos hypothesis' tokens are its parent's, one step back
        ids = np.zeros(t + 1, np.int64)
        if t >= 0:
            dk.trace(hist, back, t, int(slot[i]), ids)
        out.append(_hypothesis(model, ids, float(log_prob[i]), bool(ended[i]), alpha, score[i]))
    return out


# --------------------------------------------------------------------------- public API

def _decode(model, prompts: list[np.ndarray], opts: Options) -> list[list[Hypothesis]]:
    _check_model(model)
    if not prompts:
        return []
    seqs = _sequences(model, prompts)
    if opts.method == "beam":
        return [_beam(model, opts, s) for s in seqs]
    N = opts.num_hypotheses
    rows = _Rows(model, opts, seqs, np.repeat(np.arange(len(seqs)), N))
    while not rows.finished:
        rows.advance(opts.max_new_tokens)
    hyps = [rows.hypothesis(r) for r in range(len(seqs) * N)]
    return [sorted(hyps[p * N:(p + 1) * N], key=lambda h: -h.score) for p in range(len(seqs))]


def _encode(model, text: Any) -> np.ndarray:
    if not isinstance(text, str):
        raise LstmInferError(f"a prompt must be a string, got {type(text).__name__}")
    try:
        return model.tokenizer.encode(text)[0]
    except LstmInferError as err:
        raise LstmInferError(f"prompt {text[:40]!r}: {err}") from None


def _need_tokenizer(model, what: str) -> None:
    if model.tokenizer is None:
        raise LstmInferError(f"{_where(model)}: {what} needs a model with a tokenizer (vocab.json); "
                             "use generate_ids with token ids")


def generate(model, prompt: str | list[str] | None = None, **options: Any) -> list:
    """Continue ``prompt`` (None: from the start symbol alone); a list of prompts decodes as a batch.

    Returns a list of Hypothesis (text, ids, log_prob, score, ended), best first; for a list of prompts,
    one such list per prompt. Options (as CTranslate2 / fairseq / Hugging Face):

    - method: "greedy" (argmax), "beam" (beam search) or "sample".
    - max_new_tokens (100), min_new_tokens (0: eos is forbidden before that many new tokens).
    - beam_size (5), num_hypotheses (1: the n best beams, or n independent samples).
    - length_penalty (1.0): hypotheses rank by score = log_prob / length ** length_penalty, length the
      number of new tokens including the eos that ended it (fairseq / Hugging Face); 0 ranks by log_prob.
      Beam search stops once no live beam can reach the n best finished scores.
    - temperature (1.0), top_k (0: all), top_p (1.0): sampling from softmax(logits / temperature), cut to
      the top_k tokens, then to the smallest set whose renormalised mass reaches top_p. Reported log_probs
      are always the model's own (untempered, uncut).
    - seed (None: fresh entropy): sampling with the same seed repeats itself.
    - stop_at_eos (True): False makes eos an ordinary token and every hypothesis max_new_tokens long.
    - engine ("auto"): "compiled" insists on the compiled loops, "step" forces the layers' path
      (Model._step_layers).
    """
    opts = _options(options)
    _need_tokenizer(model, "generate")
    batch = isinstance(prompt, (list, tuple))
    texts = list(prompt) if batch else ["" if prompt is None else prompt]
    out = _decode(model, [_encode(model, t) for t in texts], opts)
    return out if batch else out[0]


def generate_ids(model, prompt_ids: Any = None, **options: Any) -> list:
    """generate() on token ids: a list of ints (None: empty), or a list of such lists for a batch.

    The start symbol, when the model has a tokenizer with one, is put in front as for text.
    """
    opts = _options(options)
    arr = [] if prompt_ids is None else prompt_ids
    batch = (isinstance(arr, np.ndarray) and arr.ndim == 2) or (
        isinstance(arr, (list, tuple)) and len(arr) > 0 and all(isinstance(p, (list, tuple, np.ndarray)) for p in arr))
    prompts = []
    for p in arr if batch else [arr]:
        try:
            p = np.asarray(p)
        except ValueError:  # ragged nesting
            raise LstmInferError("prompt_ids must be a list of token ids, or a list of such lists") from None
        prompts.append(model._ids(p.astype(np.int64) if p.size == 0 else p, 1, "prompt_ids"))
    out = _decode(model, prompts, opts)
    return out if batch else out[0]


def generate_tokens(model, prompt: str | None = None, **options: Any) -> Iterator[str]:
    """Yield the continuation's text piece by piece as tokens are produced (greedy or sample).

    The pieces joined equal generate(...)[0].text: word models put a space before every word but the
    first; byte models hold back a multi-byte character until it is complete.
    """
    opts = _options(options)
    _need_tokenizer(model, "generate_tokens")
    if opts.method == "beam" or opts.num_hypotheses != 1:
        raise LstmInferError("generate_tokens streams one greedy or sampled sequence: use generate for beams")
    _check_model(model)
    seqs = _sequences(model, [_encode(model, "" if prompt is None else prompt)])
    return _stream(model, _Rows(model, opts, seqs, np.zeros(1, np.int64)))


def _stream(model, rows: _Rows) -> Iterator[str]:
    tok = model.tokenizer
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    first = True
    while not rows.finished:
        rows.advance(1)
        v = int(rows.out_ids[0, rows.t - 1])
        if rows.done[0]:
            break
        if tok.kind == "byte":
            piece = utf8.decode(bytes([v]) if v < 256 else tok.vocab[v].encode())
        else:
            piece = tok.vocab[v] if tok.kind == "char" or first else " " + tok.vocab[v]
        first = False
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True) if tok.kind == "byte" else ""
    if tail:
        yield tail
