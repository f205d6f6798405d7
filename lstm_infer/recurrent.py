"""Run a stack of recurrent layers over a [T, B, I] batch.

Per layer and direction: one GEMM projects every timestep's input at once, then each step does one
GEMM with the recurrent weights and one fused kernel for the gates and state update. Ragged batches
carry a (T, B) ``valid`` mask: a row past its length keeps its state and emits zeros, so a forward
pass ends on each row's last valid state and a reverse pass starts at each row's own last step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import fused, gang, kernels
from .format import CELLS
from .layers import Direction, Layer, plain_lstm
from .workers import Workers

F32 = np.float32
SERIAL_BELOW = 8192  # B * H under which per-step kernels run on one thread
STEP_CHUNK, STEP_CHUNK_ROWS = 16, 1024  # input projection: at least 16 steps and 1024 rows per GEMM
PROJECT_MIN_ROWS = 32  # a batch-1 chunk's projection takes fused.project_rows from this many steps per thread
# A copy of a weight matrix in another layout pays for itself over many steps, not over one short line: with
# two 36 MB copies per layer, a one-line `lstm-infer score` of the 1500-unit model took 1.12-1.73 s, without
# them 1.18-1.32 s (same machine, minutes apart).
COPY_AFTER = 512
# Layer 0's input projection of every token, W_ih emb[v] + bias, replaces a GEMM per batch by a row copy
# per token (10 KB for the benchmark's medium model, against 3.4 MFLOP). Allowed up to this size, its rows
# filled as tokens come (TokenTable.fill): the 1500-unit model's 240 MB table took its B32xT128 batch from
# 1,987-2,047 to 2,151-2,173 tok/s (2 threads, three processes, each alternating both), as its input GEMM
# (650 -> 6000) was ~9% of the batch.
TABLE_BYTES = 256 << 20
TABLE_COLUMNS_V = 2048  # up to this vocabulary a row of the (4H, V) table (8 KB) stays in L1 while a step gathers


def run_lstm_t(ly: Layer, dw: Direction, x: np.ndarray | None, h: np.ndarray, c: np.ndarray,
               valid: np.ndarray, wk: Workers, tokens: tuple | None = None, fm_in: bool = False,
               fm_out: bool = False, scratch: str | None = None) -> np.ndarray:
    """run_direction for a standard LSTM: fused steps (fused.py) on a step-major input projection.

    The input projection runs a chunk of steps at a time, as one GEMM whose output gather_steps lays out
    step-major (n, 4H, B) with the bias added: memory stays bounded and each step's block is fresh in cache.
    A layer with a projection (w_hr) takes the per-step BLAS path, run_lstm_proj. With ``tokens``
    = (ids (T, B), a filled TokenTable) the projection is copied from the token table and x is unused.

    Panel layout only (fused.layout): with ``fm_in`` x is the previous layer's output feature-major,
    (T, I, N), and each step computes W_ih x_t in the same register tiles as W_hh h (simd.rows_gemm2):
    no projection GEMM, no gx written out and read back. ``fm_out`` returns out feature-major, (T, H, N),
    for such a next layer; otherwise out is (T, B, H). With ``scratch`` out is wk.scratch of that name (up to
    SCRATCH_BYTES), for an output that the caller consumes before the next call: a fresh array came as new
    pages, ~1,000 page faults per char-model batch, and a fault stops the whole gang at the step's end (one
    layer writing to fresh pages: 517 faults, two of its four 32-step chunks 25-26 ms instead of 21).
    """
    if dw.w_hr is not None:
        return run_lstm_proj(ly, dw, x, h, c, valid, wk)
    T, B = tokens[0].shape if tokens is not None else valid.shape
    H = ly.hidden
    panel, N = fused.layout(B, H)
    if (fm_in or fm_out) and not panel:
        raise ValueError("feature-major inputs and outputs need the panel layout")
    chunk = min(T, max(STEP_CHUNK, -(-STEP_CHUNK_ROWS // B)))
    if fm_in:  # gx holds only the bias, broadcast over the columns
        gxs = wk.buffer("gx_bias", 1, (4 * H, N))
        gxs[0] = dw.bias[:, None]
    else:
        gxs = wk.buffer("gx", chunk, (4 * H, N))  # padding columns: zeros, or an earlier call's finite values
    if not panel:  # dot layout: h batch-major
        hbuf = wk.buffer("hbuf", 2, (B, H))
        hbuf[0] = h
    else:  # panel layout: h^T, padded
        hbuf = wk.buffer("hbuf", 2, (H, N))
        hbuf[0, :, :B] = h.T
        hbuf[0, :, B:] = 0.0
    cT = wk.buffer("c", 1, (H, N))[0]
    cT[:, :B] = c.T
    cT[:, B:] = 0.0
    acc = wk.buffer("acc", 4, (H, N))
    shape = (T, H, N) if fm_out else (T, B, H)
    out = None if scratch is None else wk.scratch(scratch, shape)
    if out is None:
        out = np.empty(shape, F32)
    steps = fused.lstm_steps_panel if panel else fused.lstm_steps_dot
    regions = fused.lstm_steps_panel_regions if panel else fused.lstm_steps_dot_regions
    peep = bool(dw.peep.any())
    U = fused.unit_block(N, H)
    no_table, no_ids = np.empty((0, 0), F32), np.empty((0, 0), np.int64)
    w_ih = dw.w_ih if fm_in else np.empty((4 * H, 0), F32)
    no_x = np.empty((1, 0, N), F32)
    copies = B == 1 and _batch1(dw, T)
    starts = range(0, T, chunk)
    for t0 in reversed(starts) if dw.reverse else starts:
        t1 = min(t0 + chunk, T)
        n = t1 - t0
        members = fused.members(wk.threads, n, B, H, panel)
        xs = x[t0:t1] if fm_in else no_x
        common = (dw.w_hh, w_ih, xs, dw.peep, peep, ly.clip, ly.input_forget, valid[t0:t1], dw.reverse, hbuf, cT,
                  out[t0:t1], fm_out, acc)
        if fm_in:
            args = (gxs, *common, no_table, False, no_ids)
        elif tokens is not None and members and panel:  # the members gather their own rows of each step
            # (fused.py). Not for the dot layout: a batch-1 step's rows are single floats strewn over the
            # table, which the parallel gather beforehand fetches faster (measured: 16.3 vs 15.8 ms per
            # 512 steps of the bundled model).
            ids, tab = tokens[0][t0:t1], tokens[1]
            args = (gxs[:1], *common, tab.rows if tab.cols is None else tab.cols, tab.cols is not None, ids)
        else:
            if tokens is not None:
                ids, tab = tokens[0][t0:t1], tokens[1]
                if tab.cols is not None and panel:
                    kernels.gather_table_columns(tab.cols, ids, gxs[:n])
                else:
                    kernels.gather_table(tab.rows, ids, gxs[:n])
            else:
                _input_projection(dw, x[t0:t1], gxs[:n], wk, copies)
            args = (gxs[:n], *common, no_table, False, no_ids)
        if members and copies:  # a batch of one on a gang: the row layout
            if dw.w_hh_p is None:
                dw.w_hh_p = fused.row_panels(dw.w_hh)
            members = fused.row_blocks(H, members)
            row_args = (gxs[:n], dw.w_hh_p, dw.peep, peep, ly.clip, ly.input_forget, valid[t0:t1], dw.reverse, hbuf,
                        cT, out[t0:t1], members, gang.new_counters(n, members))
            wk.gang(functools.partial(_member, fused.lstm_steps_row, row_args), members)
        elif members:
            wk.gang(functools.partial(_member, steps, (*args, U, gang.new_counters(n, members))), members)
        else:  # Numba's threads: Model._threads set their count
            regions(*args, U)
        if n % 2:  # the final h of the chunk is in hbuf[1]
            hbuf[0] = hbuf[1]
    h[...] = hbuf[0, :, :B].T if panel else hbuf[0]
    c[...] = cT[:, :B].T
    return out


def _batch1(dw: Direction, T: int) -> bool:
    """Count T more batch-1 steps of dw: whether it has run COPY_AFTER and may make its batch-1 copies."""
    dw.batch1_steps += T
    return dw.batch1_steps >= COPY_AFTER


def _member(steps, args: tuple, me: int, members: int) -> None:
    """One gang member's run of a chunk's steps (fused.py)."""
    steps(*args, me, members)


def table_fits(layers: list[Layer], vocab: int | None) -> bool:
    """Whether layer 0 can read a token table: a one-direction standard LSTM without projection."""
    return vocab is not None and plain_lstm(layers[0]) and vocab * 4 * layers[0].hidden * 4 <= TABLE_BYTES


@dataclass
class TokenTable:
    """Layer 0's input projection per token, W_ih emb[v] + bias, its rows computed as tokens first come (fill):
    the whole table costs what projecting V tokens does (0.2 s for a 10k vocabulary), which a one-line score
    should not pay. ``rows`` (V, 4H), ``have`` (V,) marks the rows there; ``cols`` is, for vocabularies of at
    most TABLE_COLUMNS_V tokens, a (4H, V) transpose that the panel layout gathers from (see
    kernels.gather_table_columns), else None: batches of a few rows (the dot layout) copy whole rows, as a
    batch-1 step's 4H values from the (4H, V) table are 4H cache lines (bundled model, stream: 2.2 of 37 us
    per token). The compiled decoder shares rows and have (decoding._build_net)."""

    rows: np.ndarray
    cols: np.ndarray | None
    have: np.ndarray
    w_ih: np.ndarray
    bias: np.ndarray
    embedding: np.ndarray
    w_t: np.ndarray | None = None  # fused.tokens_weights(w_ih) while rows are missing (weights())

    def weights(self) -> np.ndarray:
        """W_ih^T padded for fused.project_tokens, made on first use (36 MB for a 6000 x 1500 W_ih)."""
        w_t = self.w_t
        if w_t is None:
            w_t = self.w_t = fused.tokens_weights(self.w_ih)
        return w_t

    def fill(self, ids: np.ndarray, wk: Workers) -> None:
        """Compute the rows of the ids (any shape) not there yet (fused.project_tokens), split over ``wk``."""
        if self.have[ids].all():  # the common case once the batch's tokens have been seen: no sort
            return
        new = np.unique(ids)
        new = new[~self.have[new]]
        cols = self.cols if self.cols is not None else np.empty((0, 0), F32)
        w_t = self.weights()
        wk.split(lambda s, e: fused.project_tokens(self.embedding, w_t, self.bias, new[s:e], self.rows, cols,
                                                   self.have), new.size, 64)
        if self.have.all():  # a whole table needs its weights no more
            self.w_t = None


def token_table(ly: Layer, vocab: int, embedding: np.ndarray) -> TokenTable:
    """An empty TokenTable for layer 0 ``ly`` (see table_fits)."""
    G = 4 * ly.hidden
    dw = ly.dirs[0]
    cols = np.zeros((G, vocab), F32) if vocab <= TABLE_COLUMNS_V else None
    return TokenTable(np.zeros((vocab, G), F32), cols, np.zeros(vocab, bool), dw.w_ih,
                      np.ascontiguousarray(dw.bias, F32), np.asarray(embedding))


def _input_projection(dw: Direction, x: np.ndarray, gxs: np.ndarray, wk: Workers, copies: bool = False) -> None:
    """gxs (n, G, N) = W_ih x[t] + bias for x (n, B, I), N >= B; the workers split the steps. ``copies``: a
    batch of one may use (and make) dw.w_ih_t (see COPY_AFTER)."""
    n, B, I = x.shape
    if B == 1:  # (n, G, 1) is the GEMM's own (n, G) layout
        g2 = gxs.reshape(n, -1)
        G = g2.shape[1]
        if copies and n >= PROJECT_MIN_ROWS and G % fused.LANES == 0 and I > 0:
            if dw.w_ih_t is None:
                dw.w_ih_t = np.ascontiguousarray(dw.w_ih.T)
            x2 = np.ascontiguousarray(x.reshape(n, I))
            wk.split(lambda s, e: fused.project_rows(x2, s, e, dw.w_ih_t, dw.bias, g2), n, PROJECT_MIN_ROWS)
            return
        wk.matmul(x.reshape(n, I), dw.w_ih.T, out=g2)
        g2 += dw.bias
        return

    def part(s: int, e: int) -> None:
        kernels.gather_steps(np.matmul(dw.w_ih, x[s:e].reshape((e - s) * B, I).T), dw.bias, gxs[s:e])

    wk.split(part, n)


def run_lstm_proj(ly: Layer, dw: Direction, x: np.ndarray, h: np.ndarray, c: np.ndarray,
                  valid: np.ndarray, wk: Workers) -> np.ndarray:
    """A standard LSTM with a projection, in feature-major layout: the state lives as h^T (P, B), c^T (H, B).

    OpenBLAS runs the per-step product 30-45% faster as W_hh (4H, P) @ h^T (P, B) than as h @ W_hh^T
    (measured at B=32, H=512-650, 1 and 2 threads); the gate kernel splits hidden units across threads.
    """
    T, B, I = x.shape
    H, P = ly.hidden, ly.out
    chunk = min(T, max(STEP_CHUNK, -(-STEP_CHUNK_ROWS // B)))
    gxs = np.empty((chunk, 4 * H, B), F32)
    hT, cT = np.ascontiguousarray(h.T), np.ascontiguousarray(c.T)
    gh, y = np.empty((4 * H, B), F32), np.empty((H, B), F32)
    yp = np.empty((P, B), F32)
    out = np.empty((T, B, P), F32)
    serial = B * H < SERIAL_BELOW
    flat = kernels.lstm_step_flat_serial if serial else kernels.lstm_step_flat
    rows = kernels.lstm_step_rows_serial if serial else kernels.lstm_step_rows
    plain = not dw.peep.any()
    full = valid.all(axis=1)
    copies = B == 1 and _batch1(dw, T)
    starts = range(0, T, chunk)
    for t0 in reversed(starts) if dw.reverse else starts:
        t1 = min(t0 + chunk, T)
        n = t1 - t0
        _input_projection(dw, x[t0:t1], gxs[:n], wk, copies)
        for t in range(t1 - 1, t0 - 1, -1) if dw.reverse else range(t0, t1):
            if B == 1:  # vector-matrix: OpenBLAS's h @ W_hh^T form is the faster one here (measured)
                wk.matmul(hT.T, dw.w_hh.T, out=gh.T)
            else:
                wk.matmul(dw.w_hh, hT, out=gh)
            if plain and full[t]:
                flat(gxs[t - t0], gh, ly.clip, ly.input_forget, cT, y)
            else:
                rows(gxs[t - t0], gh, dw.peep, ly.clip, ly.input_forget, cT, y, valid[t])
            wk.matmul(dw.w_hr, y, out=yp)
            kernels.commit_t(yp, hT, out[t], valid[t])
    h[...] = hT.T
    c[...] = cT.T
    return out


def run_direction(ly: Layer, dw: Direction, x: np.ndarray, h: np.ndarray, c: np.ndarray | None,
                  valid: np.ndarray, wk: Workers, scratch: str | None = None) -> np.ndarray:
    """x (T, B, I) -> out (T, B, P); h (B, P) and c (B, H) are updated in place; ``scratch`` as in run_lstm_t."""
    if ly.cell == "lstm" and dw.standard:
        return run_lstm_t(ly, dw, x, h, c, valid, wk, scratch=scratch)
    T, B, _ = x.shape
    H, P, G = ly.hidden, ly.out, CELLS[ly.cell]
    gx = wk.matmul(x.reshape(T * B, -1), dw.w_ih.T).reshape(T, B, G * H)
    out = np.empty((T, B, P), F32)
    gh = np.empty((B, G * H), F32)
    y = np.empty((B, H), F32)
    yp = np.empty((B, P), F32) if dw.w_hr is not None else y
    work = np.empty((B, G * H), F32) if not dw.standard else gh
    rz, rh, ghn = (np.empty((B, 2 * H), F32), np.empty((B, H), F32), np.empty((B, H), F32)) \
        if ly.cell == "gru" else (y, y, y)
    w_hh_rz, w_hn = dw.w_hh[: 2 * H], dw.w_hh[2 * H:]
    # A parallel region per step only pays when the step has real work to split.
    small = B * H < SERIAL_BELOW
    commit = kernels.commit_serial if small else kernels.commit
    for t in range(T - 1, -1, -1) if dw.reverse else range(T):
        v = valid[t]
        if ly.cell == "lstm":
            wk.matmul(h, dw.w_hh.T, out=gh)  # custom activations (standard ones take run_lstm_t)
            kernels.lstm_step_generic(gx[t], gh, dw.bias, dw.peep, ly.clip, ly.input_forget, c, y, v,
                                      dw.codes, dw.alphas, dw.betas, work)
            if dw.w_hr is not None:
                wk.matmul(y, dw.w_hr.T, out=yp)
        elif ly.cell == "gru":
            if ly.lbr:
                wk.matmul(h, dw.w_hh.T, out=gh)
                kernels.gru_gates(gx[t], gh, dw.bias, ly.clip, h, rz, rh, v, dw.codes, dw.alphas, dw.betas)
                ghn = gh[:, 2 * H:]
            else:
                wk.matmul(h, w_hh_rz.T, out=gh[:, : 2 * H])
                kernels.gru_gates(gx[t], gh, dw.bias, ly.clip, h, rz, rh, v, dw.codes, dw.alphas, dw.betas)
                wk.matmul(rh, w_hn.T, out=ghn)
            kernels.gru_update(gx[t], ghn, dw.b_hn, dw.bias, ly.clip, ly.lbr, h, rz, y, v,
                               dw.codes, dw.alphas, dw.betas)
        else:
            wk.matmul(h, dw.w_hh.T, out=gh)
            kernels.rnn_step(gx[t], gh, dw.bias, ly.clip, y, v, dw.codes, dw.alphas, dw.betas)
        commit(yp, h, out[t], v)
    return out


def feature_major(ly: Layer, B: int) -> bool:
    """Whether ``ly`` can take its input and give its output feature-major, (T, H, N), for B rows: a plain
    LSTM in the panel layout (run_lstm_t's fm_in, fm_out)."""
    return plain_lstm(ly) and fused.layout(B, ly.hidden)[0]


def run_stack(layers: list[Layer], x: np.ndarray | None, state: list, valid: np.ndarray, wk: Workers,
              tokens: tuple | None = None, fm_last: bool = False, keep_last: bool = True) -> np.ndarray:
    """x (T, B, I) through every layer; ``state`` (from zero_state) is updated in place; ``wk`` runs the GEMMs.

    ``tokens`` = (ids (T, B), a filled TokenTable) stands in for x where layer 0 reads a token table (table_fits).
    Between two plain LSTM layers in the panel layout the output passes feature-major, (T, H, N), and the
    next layer folds its input projection into its steps (run_lstm_t's fm_in).
    Returns the last layer's output (T, B, D * P), or with ``fm_last`` (only where feature_major(layers[-1], B))
    (T, H, N) feature-major, padding columns b >= B finite. The layers between write into wk's scratch
    buffers, and so does the last unless ``keep_last``: its output is then good until wk's next call.
    """
    B = valid.shape[1]
    fm = [feature_major(ly, B) for ly in layers]
    if fm_last and not fm[-1]:
        raise ValueError("a feature-major output needs a plain LSTM last layer in the panel layout")
    k = 0
    fm_in = False
    for li, ly in enumerate(layers):
        fm_out = fm[li] and (fm[li + 1] if li + 1 < len(layers) else fm_last)
        outs = []
        for d, dw in enumerate(ly.dirs):
            h, c = state[k]
            # alternate buffers: a layer reads the one before it while it writes
            scratch = None if keep_last and li == len(layers) - 1 else f"layer{li % 2}.{d}"
            if li == 0 and tokens is not None:
                outs.append(run_lstm_t(ly, dw, None, h, c, valid, wk, tokens, fm_out=fm_out, scratch=scratch))
            elif fm_in or fm_out:
                outs.append(run_lstm_t(ly, dw, x, h, c, valid, wk, fm_in=fm_in, fm_out=fm_out, scratch=scratch))
            else:
                outs.append(run_direction(ly, dw, x, h, c, valid, wk, scratch))
            k += 1
        x = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=2)
        fm_in = fm_out
    return x
