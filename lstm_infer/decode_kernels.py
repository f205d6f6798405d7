"""Compiled decoding: one recurrent step for many rows, the output head, token choice, beam bookkeeping.

The loops ``decode_rows`` (greedy / sampling) and ``beam_search`` run many tokens in one call, so no
Python runs per token. The pickers and the beam update are plain @njit functions that the slow
``Model._step_layers`` fallback in decoding.py calls too, so both paths choose tokens by the same code.

``net`` (built once per Model by decoding.py) is a tuple
``(cell, flags, w, woff, isz, bias, table, b_hn, w_hr, emb, head_w, head_b, Hp, head_t, have, w_t)``:

    cell   int         0 lstm, 1 gru, 2 rnn; every layer the same cell, H and P
    flags  (L, 2)      int64 per layer: linear_before_reset, activation code (rnn: 1 tanh, 2 relu)
    w      float32, layer l at w[woff[l]:woff[l+1]], K_l = I_l + P. An LSTM without projection (Hp > 0):
                        (Hp/16, K_l, 64) panels of 16 units, Hp = H rounded up to 16 (zero padding),
                        panel u's row k = [gate i, f, g, o of units 16u .. 16u+15] (lstm_cells_t).
                        Otherwise (H, G, K_l): row [j, g] = [W_ih row g*H+j | W_hh row g*H+j], one
                        unit's weights for all gates together (lstm_cells and the other cells)
    woff   (L+1,) int64,  isz (L,) int64 input size I_l (0 for layer 0 when the table replaces W_ih)
    bias   (L, 1, G, H) summed biases (gru: n keeps b_in)
    table  (V, G, H)   W_ih emb[v] + bias of layer 0 for every token v, or (0, G, H): one row read per
                        token instead of all of W_ih
    b_hn   (L, H)      gru recurrent bias of n,  w_hr (L, P, H) lstm projection, (L, 0, 0) without
    emb    (V, E),  head_w (K, F),  head_b (K,),  Hp int (0: w is not in panels)
    head_t (Kp/64, F, 64) head_w in panels of 64 tokens (Kp = K rounded up to 64; zero padding), or
                        (0, 0, 64) when that copy would pass TABLE_BYTES (head_blocks)
    have   (V,) bool   which table rows are there: all for a table built whole; a table filled on demand
                        (fill_rows) starts with none; (0,) without a table
    w_t    (E, Gp)     layer 0's W_ih for fill_rows (fused.tokens_weights), or (0, 0) unless the table fills
                        on demand

State lives in double buffers: hbuf (2, L, R, P), cbuf (2, L, R, H). A step reads the ``cur`` half and
writes the other; row b continues from row ``par[b]`` of the old half, which is how beams reorder
(and sampled rows fork from one prompt) without copying any state.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fused import dot4x1, dot4x4, project_tokens
from .gang import finish, take, wait_all
from .kernels import BIG, FAST, fsigmoid, ftanh
from .simd import SMALL_ROWS, small_rows

F32 = np.float32
_ZERO, _ONE, _HALF = F32(0.0), F32(1.0), F32(0.5)

# exp for x <= 0 (Cephes expf polynomial, relative error ~2e-7): vectorises where np.exp is a libm call.
_LOG2E, _LN2_HI, _LN2_LO = F32(1.44269504088896341), F32(0.693359375), F32(-2.12194440e-4)
_E0, _E1, _E2 = F32(1.9875691500e-4), F32(1.3981999507e-3), F32(8.3334519073e-3)
_E3, _E4, _E5 = F32(4.1665795894e-2), F32(1.6666665459e-1), F32(5.0000001201e-1)
_POW2 = np.array([2.0 ** k for k in range(-126, 1)], np.float32)  # 2**n for n in [-126, 0]


@njit(inline="always", **FAST)
def fexp(x):
    x = min(max(x, F32(-87.0)), _ZERO)
    n = np.floor(x * _LOG2E + _HALF)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = (((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * r * r + r + _ONE
    return p * _POW2[np.int64(n) + 126]


# --------------------------------------------------------------------------- dot-product blocks

@njit(inline="always", **FAST)
def _dot4x4(w0, w1, w2, w3, x0, x1, x2, x3, a):
    """a[r, q] += w_r . x_q for four weight rows and four inputs, all (K,)."""
    s = dot4x4(w0, w1, w2, w3, x0, x1, x2, x3)
    for r in range(4):
        for q in range(4):
            a[r, q] += s[4 * r + q]


@njit(inline="always", **FAST)
def _dot4x1(w0, w1, w2, w3, x, a, q):
    """a[r, q] += w_r . x for four weight rows, all (K,)."""
    s = dot4x1(w0, w1, w2, w3, x)
    for r in range(4):
        a[r, q] += s[r]


@njit(inline="always", **FAST)
def _dot4x5(w0, w1, w2, w3, x0, x1, x2, x3, x4, a):
    """a[r, q] += w_r . x_q for four weight rows and five inputs (a beam of 5 in one pass over the weights):
    20 accumulators, each weight loaded feeds five FMAs."""
    s00 = s01 = s02 = s03 = s04 = s10 = s11 = s12 = s13 = s14 = _ZERO
    s20 = s21 = s22 = s23 = s24 = s30 = s31 = s32 = s33 = s34 = _ZERO
    for k in range(w0.shape[0]):
        v0, v1, v2, v3, v4 = x0[k], x1[k], x2[k], x3[k], x4[k]
        u = w0[k]
        s00 += u * v0
        s01 += u * v1
        s02 += u * v2
        s03 += u * v3
        s04 += u * v4
        u = w1[k]
        s10 += u * v0
        s11 += u * v1
        s12 += u * v2
        s13 += u * v3
        s14 += u * v4
        u = w2[k]
        s20 += u * v0
        s21 += u * v1
        s22 += u * v2
        s23 += u * v3
        s24 += u * v4
        u = w3[k]
        s30 += u * v0
        s31 += u * v1
        s32 += u * v2
        s33 += u * v3
        s34 += u * v4
    s = (s00, s01, s02, s03, s04, s10, s11, s12, s13, s14, s20, s21, s22, s23, s24, s30, s31, s32, s33, s34)
    for r in range(4):
        for q in range(5):
            a[r, q] += s[5 * r + q]


@njit(inline="always", **FAST)
def _group(n, b0):
    """Rows per pass from row b0 of n: fours, but a last five in one pass (beam 5, 9, ...)."""
    return 5 if n - b0 == 5 else min(4, n - b0)


@njit(inline="always", **FAST)
def _dots(w0, w1, w2, w3, xs, rows, b0, nb, a):
    """a[r, q] += w_r . xs[rows[b0 + q]] for four weight rows w_r (K,) and q < nb <= 5."""
    if nb == 5:
        _dot4x5(w0, w1, w2, w3, xs[rows[b0]], xs[rows[b0 + 1]], xs[rows[b0 + 2]], xs[rows[b0 + 3]],
                xs[rows[b0 + 4]], a)
    elif nb == 4:
        _dot4x4(w0, w1, w2, w3, xs[rows[b0]], xs[rows[b0 + 1]], xs[rows[b0 + 2]], xs[rows[b0 + 3]], a)
    else:
        for q in range(nb):
            _dot4x1(w0, w1, w2, w3, xs[rows[b0 + q]], a, q)


# --------------------------------------------------------------------------- recurrent cells
# Every cell kernel: rows b < n, input x[b] (I,), previous state row par[b] of hp (P,) (and cp (H,));
# w (H, G, I + P); pre (*, G, H) starts each gate's sum: the bias (prow all 0) or, for a layer-0
# table, W_ih x + bias of token prow[b] (then I = 0); ident = arange; acc (H, 2, 4, 5) scratch.
# Threads split the hidden units; each unit's G weight rows serve up to 4 rows at a time (LSTM: 5 for a
# last group of five, so that beam 5 reads the weights once per step).

@njit(parallel=True, **FAST)
def lstm_cells(w, pre, prow, x, hp, cp, par, ident, n, acc, c_out, y_out):
    """Gates i, f, g, o -> c_out[b] (H,) and y_out[b] = o * tanh(c) (the state before any projection)."""
    H, I = w.shape[0], x.shape[1]
    for j in prange(H):
        wj, a = w[j], acc[j, 0]
        b0 = 0
        while b0 < n:
            nb = _group(n, b0)
            for q in range(nb):
                for g in range(4):
                    a[g, q] = pre[prow[b0 + q], g, j]
            _dots(wj[0, :I], wj[1, :I], wj[2, :I], wj[3, :I], x, ident, b0, nb, a)
            _dots(wj[0, I:], wj[1, I:], wj[2, I:], wj[3, I:], hp, par, b0, nb, a)
            for q in range(nb):
                b = b0 + q
                c = fsigmoid(a[1, q]) * cp[par[b], j] + fsigmoid(a[0, q]) * ftanh(a[2, q])
                c_out[b, j] = c
                y_out[b, j] = fsigmoid(a[3, q]) * ftanh(c)
            b0 += nb


@njit(parallel=True, **FAST)
def project(w_hr, y, ident, n, acc, h_out):
    """LSTM projection: h_out[b] (P,) = w_hr (P, H) @ y[b] (H,), four output rows at a time."""
    P = w_hr.shape[0]
    for blk in prange((P + 3) // 4):
        p0 = 4 * blk
        r1, r2, r3 = min(p0 + 1, P - 1), min(p0 + 2, P - 1), min(p0 + 3, P - 1)  # a short tail repeats a row
        a = acc[blk, 0]
        for b0 in range(0, n, 4):
            nb = min(4, n - b0)
            a[:, :] = _ZERO
            _dots(w_hr[p0], w_hr[r1], w_hr[r2], w_hr[r3], y, ident, b0, nb, a)
            for q in range(nb):
                for r in range(min(4, P - p0)):
                    h_out[b0 + q, p0 + r] = a[r, q]


@njit(parallel=True, **FAST)
def gru_cells(w, pre, prow, b_hn, x, hp, par, ident, n, acc, h_out):
    """GRU, linear_before_reset form: n = tanh(W_in x + b_in + r * (W_hn h + b_hn))."""
    H, I = w.shape[0], x.shape[1]
    for j in prange(H):
        wj, a, ah = w[j], acc[j, 0], acc[j, 1]
        for b0 in range(0, n, 4):
            nb = min(4, n - b0)
            a[:, :] = _ZERO
            ah[:, :] = _ZERO
            for q in range(nb):
                for g in range(3):
                    a[g, q] = pre[prow[b0 + q], g, j]
                ah[2, q] = b_hn[j]
            # three gate rows: the fourth slot repeats n and is not used
            _dots(wj[0, :I], wj[1, :I], wj[2, :I], wj[2, :I], x, ident, b0, nb, a)
            _dots(wj[0, I:], wj[1, I:], wj[2, I:], wj[2, I:], hp, par, b0, nb, ah)
            for q in range(nb):
                b = b0 + q
                z = fsigmoid(a[1, q] + ah[1, q])
                nn = ftanh(a[2, q] + fsigmoid(a[0, q] + ah[0, q]) * ah[2, q])
                h_out[b, j] = (_ONE - z) * nn + z * hp[par[b], j]


@njit(parallel=True, **FAST)
def gru_gates0(w, pre, prow, x, hp, par, ident, n, acc, zb, nxb, rh):
    """GRU without linear_before_reset, phase 1: z, W_in x + b_n and r * h, each (R, H)."""
    H, I = w.shape[0], x.shape[1]
    for j in prange(H):
        wj, a, ah = w[j], acc[j, 0], acc[j, 1]
        for b0 in range(0, n, 4):
            nb = min(4, n - b0)
            a[:, :] = _ZERO
            ah[:, :] = _ZERO
            for q in range(nb):
                for g in range(3):
                    a[g, q] = pre[prow[b0 + q], g, j]
            _dots(wj[0, :I], wj[1, :I], wj[2, :I], wj[2, :I], x, ident, b0, nb, a)
            _dots(wj[0, I:], wj[1, I:], wj[0, I:], wj[1, I:], hp, par, b0, nb, ah)
            for q in range(nb):
                b = b0 + q
                zb[b, j] = fsigmoid(a[1, q] + ah[1, q])
                nxb[b, j] = a[2, q]
                rh[b, j] = fsigmoid(a[0, q] + ah[0, q]) * hp[par[b], j]


@njit(parallel=True, **FAST)
def gru_update0(w, I, hp, par, ident, n, acc, zb, nxb, rh, h_out):
    """Phase 2: n = tanh(W_in x + b_n + W_hn (r * h)), b_n holding both biases; h' = (1 - z) n + z h."""
    H = w.shape[0]
    for j in prange(H):
        wn, a = w[j, 2, I:], acc[j, 0]
        for b0 in range(0, n, 4):
            nb = min(4, n - b0)
            a[:, :] = _ZERO
            _dots(wn, wn, wn, wn, rh, ident, b0, nb, a)
            for q in range(nb):
                b = b0 + q
                z = zb[b, j]
                h_out[b, j] = (_ONE - z) * ftanh(nxb[b, j] + a[0, q]) + z * hp[par[b], j]


@njit(parallel=True, **FAST)
def rnn_cells(w, pre, prow, act, x, hp, par, ident, n, acc, h_out):
    """Elman RNN: h' = act(W_ih x + W_hh h + b), act 1 tanh, 2 relu. w (H, 1, I + P)."""
    H, I = w.shape[0], x.shape[1]
    for j in prange(H):
        wx, wh, a = w[j, 0, :I], w[j, 0, I:], acc[j, 0]
        for b0 in range(0, n, 4):
            nb = min(4, n - b0)
            a[:, :] = _ZERO
            for q in range(nb):
                a[0, q] = pre[prow[b0 + q], 0, j]
            _dots(wx, wx, wx, wx, x, ident, b0, nb, a)  # one gate row: the other slots repeat it
            _dots(wh, wh, wh, wh, hp, par, b0, nb, a)
            for q in range(nb):
                s = a[0, q]
                h_out[b0 + q, j] = ftanh(s) if act == 1 else max(s, _ZERO)


@njit(parallel=True, **FAST)
def lstm_cells_t(wt, pre, prow, x, hp, cp, par, n, c_out, y_out):
    """lstm_cells on a transposed layer: wt (Hp/16, K = I + P, 64), panel u's column g*16 + l holding gate
    g of unit u*16 + l. Each panel is a small GEMM, rows [x[b] | hp[par[b]]] times its 64 columns
    (simd.small_rows: weights along the vector lanes, one broadcast per row and k, no horizontal sums;
    the panel streams front to back), then the gates of its units."""
    z = np.empty((n, wt.shape[1]), F32)
    _rows_in(x, hp, par, n, z)
    nblk = wt.shape[0]
    out = np.empty((nblk, n, 64), F32)
    for u in prange(nblk):
        _cells_t_panel(u, wt, pre, prow, z, cp, par, n, c_out, y_out, out[u])


@njit(inline="always", **FAST)
def _rows_in(x, hp, par, n, z):
    """z[b] = [x[b] | hp[par[b]]] for b < n: the rows a transposed layer's panels multiply."""
    I = x.shape[1]
    K = z.shape[1]
    for b in range(n):
        for k in range(I):
            z[b, k] = x[b, k]
        hb = hp[par[b]]
        for k in range(K - I):
            z[b, I + k] = hb[k]


@njit(inline="always", **FAST)
def _rows_panel(z, n, panel, o):
    """o[b] (64,) = z[b] (K,) @ panel (K, 64) for b < n, SMALL_ROWS rows at a time (simd.small_rows)."""
    K = panel.shape[0]
    b0 = 0
    while b0 < n:
        nr = min(SMALL_ROWS, n - b0)
        small_rows(nr, z[b0:].ctypes.data, z.shape[1], panel.ctypes.data, 64, K, o[b0:].ctypes.data, 64)
        b0 += nr


@njit(inline="always", **FAST)
def _cells_t_panel(u, wt, pre, prow, z, cp, par, n, c_out, y_out, o):
    """Panel u of lstm_cells_t: its small GEMM into o (>= n, 64), then its 16 units' gates."""
    H = c_out.shape[1]
    _rows_panel(z, n, wt[u], o)
    j0 = u * 16
    for b in range(n):  # pre gate-major: with (H, G) rows this loop did not vectorise and took 9 of a
        # 512-unit batch-1 step's 58 us (4 MB of weights, one Zen 4 core); now 1
        ob, pb, cpb, cb, yb = o[b], pre[prow[b]], cp[par[b]], c_out[b], y_out[b]
        for q in range(min(16, H - j0)):
            j = j0 + q
            ig, fg = fsigmoid(pb[0, j] + ob[q]), fsigmoid(pb[1, j] + ob[16 + q])
            c = fg * cpb[j] + ig * ftanh(pb[2, j] + ob[32 + q])
            cb[j] = c
            yb[j] = fsigmoid(pb[3, j] + ob[48 + q]) * ftanh(c)


@njit(**FAST)
def _layer(net, l, x, pre, prow, hbuf, cbuf, scratch, acc, cur, par, ident, n):
    cell, flags, w, woff, isz, w_hr, Hp = net[0], net[1], net[2], net[3], net[4], net[8], net[12]
    G, H = pre.shape[1], pre.shape[2]
    P = hbuf.shape[3]
    nxt = 1 - cur
    hp, h_out = hbuf[cur, l], hbuf[nxt, l]
    if Hp > 0:  # a plain LSTM, transposed (decoding._build_net)
        wt = w[woff[l]:woff[l + 1]].reshape((Hp // 16, isz[l] + P, 64))
        lstm_cells_t(wt, pre, prow, x, hp, cbuf[cur, l], par, n, cbuf[nxt, l], h_out)
        return
    wl = w[woff[l]:woff[l + 1]].reshape((H, G, isz[l] + P))
    if cell == 0:
        if w_hr.shape[1] == 0:
            lstm_cells(wl, pre, prow, x, hp, cbuf[cur, l], par, ident, n, acc, cbuf[nxt, l], h_out)
        else:
            lstm_cells(wl, pre, prow, x, hp, cbuf[cur, l], par, ident, n, acc, cbuf[nxt, l], scratch[0])
            project(w_hr[l], scratch[0], ident, n, acc, h_out)
    elif cell == 1:
        if flags[l, 0]:
            gru_cells(wl, pre, prow, net[7][l], x, hp, par, ident, n, acc, h_out)
        else:
            gru_gates0(wl, pre, prow, x, hp, par, ident, n, acc, scratch[0], scratch[1], scratch[2])
            gru_update0(wl, isz[l], hp, par, ident, n, acc, scratch[0], scratch[1], scratch[2], h_out)
    else:
        rnn_cells(wl, pre, prow, flags[l, 1], x, hp, par, ident, n, acc, h_out)


@njit(**FAST)
def fill_rows(net, tok, n):
    """The table rows W_ih emb[v] + bias of the tokens v = tok[b], b < n, that are not there yet, when the
    table fills on demand (fused.project_tokens): one pass over W_ih per new token, what every step without
    a table pays."""
    w_t, have = net[15], net[14]
    if w_t.shape[0] == 0:
        return
    fresh = False
    for b in range(n):
        fresh |= not have[tok[b]]
    if fresh:  # most steps: nothing to allocate
        table, bias = net[6], net[5]
        V, G, H = table.shape
        project_tokens(net[9], w_t, bias[0, 0].reshape(G * H), tok[:n], table.reshape(V, G * H),
                       np.empty((0, 0), F32), have)


@njit(**FAST)
def stack_step(net, hbuf, cbuf, scratch, acc, cur, tok, par, ident, n):
    """Rows b < n take token tok[b] and continue state row par[b] of half ``cur``; writes half 1 - cur.

    scratch (3, R, H) and acc (H, 2, 4, 5) float32 scratch; ident (R,) = arange(R).
    """
    fill_rows(net, tok, n)
    bias, table, emb = net[5], net[6], net[9]
    zeros = np.zeros(n, np.int64)
    if table.shape[0] > 0:
        x0 = np.empty((n, 0), F32)  # the table already holds W_ih x + bias
    else:
        x0 = np.empty((n, emb.shape[1]), F32)
        for b in range(n):
            x0[b] = emb[tok[b]]
    for l in range(hbuf.shape[1]):
        x = x0 if l == 0 else hbuf[1 - cur, l - 1]
        if l == 0 and table.shape[0] > 0:
            _layer(net, l, x, table, tok, hbuf, cbuf, scratch, acc, cur, par, ident, n)
        else:
            _layer(net, l, x, bias[l], zeros, hbuf, cbuf, scratch, acc, cur, par, ident, n)


# --------------------------------------------------------------------------- output head

@njit(parallel=True, **FAST)
def head_blocks(head_w, head_t, head_b, f, ident, n, nblk, acc, logits, bmax, bsum):
    """logits[b] (K,) = head_w (K, F) @ f[b] + head_b for rows b < n, in nblk vocabulary blocks.

    Per block and row also the max (bmax (R, nblk)) and sum of exp(logit - max) (bsum), so that the
    log-sum-exp needs no second pass over the vocabulary. acc (nblk, R, 64) scratch. With head_t, the
    head in panels of 64 tokens (Kp/64, F, 64) (decoding._build_net), blocks are whole panels and each
    panel is a small GEMM like lstm_cells_t's; with an empty head_t, dot products of head_w's rows.
    """
    for blk in prange(nblk):
        _head_block(blk, head_w, head_t, head_b, f, ident, n, nblk, acc, logits, bmax, bsum)


@njit(inline="always", **FAST)
def _head_block(blk, head_w, head_t, head_b, f, ident, n, nblk, acc, logits, bmax, bsum):
    """Block blk of head_blocks."""
    K = head_w.shape[0]
    npan = head_t.shape[0]
    if npan > 0:
        p0, p1 = blk * npan // nblk, (blk + 1) * npan // nblk
        lo, hi = p0 * 64, min(K, p1 * 64)
        o = acc[blk]
        for p in range(p0, p1):
            _rows_panel(f, n, head_t[p], o)
            v0 = p * 64
            for b in range(n):
                lb, ob = logits[b], o[b]
                for q in range(min(64, K - v0)):
                    lb[v0 + q] = ob[q] + head_b[v0 + q]
    else:
        lo, hi = blk * K // nblk, (blk + 1) * K // nblk
        a = acc[blk]
        for v in range(lo, hi, 4):
            r1, r2, r3 = min(v + 1, hi - 1), min(v + 2, hi - 1), min(v + 3, hi - 1)  # a short tail repeats
            b0 = 0
            while b0 < n:  # rows in fours, a last five in one pass
                nb = _group(n, b0)
                a[:4, :5] = _ZERO
                _dots(head_w[v], head_w[r1], head_w[r2], head_w[r3], f, ident, b0, nb, a)
                for q in range(nb):
                    for r in range(min(4, hi - v)):
                        logits[b0 + q, v + r] = a[r, q] + head_b[v + r]
                b0 += nb
    for b in range(n):
        lb = logits[b]
        m = -BIG
        for v in range(lo, hi):
            m = max(m, lb[v])
        s = _ZERO
        for v in range(lo, hi):
            s += fexp(lb[v] - m)
        bmax[b, blk] = m
        bsum[b, blk] = s


@njit(**FAST)
def head_lse(head_w, head_t, head_b, f, ident, n, nblk, logits, bmax, bsum, lse):
    """Logits of rows b < n into logits (R, K) and their log-sum-exp into lse (R,) float64."""
    acc = np.empty((nblk, max(n, 5), 64), F32)
    head_blocks(head_w, head_t, head_b, f, ident, n, nblk, acc, logits, bmax, bsum)
    _lse(bmax, bsum, n, nblk, lse)


@njit(inline="always", **FAST)
def _lse(bmax, bsum, n, nblk, lse):
    """lse[b] (float64) from the blocks' maxima and sums of exp(logit - max) (head_blocks)."""
    for b in range(n):
        m = -BIG
        for k in range(nblk):
            m = max(m, bmax[b, k])
        s = 0.0
        for k in range(nblk):
            s += np.float64(bsum[b, k]) * np.exp(np.float64(bmax[b, k] - m))
        lse[b] = m + np.log(s)


# --------------------------------------------------------------------------- choosing tokens

@njit(**FAST)
def pick_greedy(row, ban):
    """Index of the largest entry of row (K,), skipping index ``ban`` (-1: none); first on ties."""
    saved = _ZERO
    if ban >= 0:
        saved = row[ban]
        row[ban] = -BIG
    m = -BIG
    for v in range(row.shape[0]):
        m = max(m, row[v])
    arg = 0
    for v in range(row.shape[0]):
        if row[v] == m:
            arg = v
            break
    if ban >= 0:
        row[ban] = saved
    return arg


@njit(**FAST)
def pick_sample(row, ban, temperature, top_k, top_p, u, e, idx):
    """Draw from softmax(row / temperature) restricted to the top_k entries (0: all), then to the
    nucleus: the fewest most-probable entries whose renormalised mass reaches top_p. u in [0, 1).

    row (K,) logits; e (K,) float32 and idx (K,) int64 scratch. Index ``ban`` (-1: none) has mass 0.
    """
    K = row.shape[0]
    m = -BIG
    for v in range(K):
        if v != ban:
            m = max(m, row[v])
    inv = F32(1.0 / temperature)
    total = 0.0
    for v in range(K):
        e[v] = fexp((row[v] - m) * inv)
    if ban >= 0:
        e[ban] = _ZERO
    for v in range(K):
        total += e[v]
    if top_k == 0 and top_p >= 1.0:
        target, cum = u * total, 0.0
        last = 0
        for v in range(K):
            if e[v] > 0:
                cum += e[v]
                last = v
                if cum > target:
                    return v
        return last
    # The answer lies among the entries above some threshold t: lower t until that set holds top_k
    # entries (top_k > 0: the nucleus is then inside the top k) or top_p of the mass, then sort it alone.
    t = F32(1.0)
    while True:
        t *= F32(0.0625)
        if t < F32(1e-30):
            t = F32(0.0)
        cnt, mass = 0, 0.0
        for v in range(K):
            if e[v] >= t and e[v] > 0:
                cnt += 1
                mass += e[v]
        if t == 0 or (cnt >= top_k if top_k > 0 else mass >= top_p * total):
            break
    cnt = 0
    for v in range(K):
        if e[v] >= t and e[v] > 0:
            idx[cnt] = v
            cnt += 1
    sel = idx[:cnt]
    order = np.argsort(-e[sel], kind="mergesort")  # stable: equal masses keep index order
    keep = min(cnt, top_k) if top_k > 0 else cnt
    mass = 0.0
    for i in range(keep):
        mass += e[sel[order[i]]]
    if top_p < 1.0:
        cum, need = 0.0, top_p * mass
        for i in range(keep):
            cum += e[sel[order[i]]]
            if cum >= need:
                keep = i + 1
                mass = cum
                break
    target, cum = u * mass, 0.0
    for i in range(keep):
        cum += e[sel[order[i]]]
        if cum > target:
            return sel[order[i]]
    return sel[order[keep - 1]]


@njit(**FAST)
def pick_rows(logits, lse, n, t, min_new, eos, stop, sample, temperature, top_k, top_p, rng,
              done, tok, out_ids, out_lp, e, idx):
    """Step t of greedy or sampled decoding for rows b < n that are not done.

    logits (R, K) and lse (R,): log-probs are logits - lse. Writes out_ids[b, t] (int64) and
    out_lp[b, t] (float64, the model's log-prob, untempered), sets tok[b] to the next input, and marks a
    row done when it emits eos and ``stop``. eos < 0: none. One rng draw per sampled row. Returns
    whether every row is done.
    """
    ban = eos if (eos >= 0 and t < min_new) else -1
    all_done = True
    for b in range(n):
        if done[b]:
            continue
        if sample:
            v = pick_sample(logits[b], ban, temperature, top_k, top_p, rng.random(), e, idx)
        else:
            v = pick_greedy(logits[b], ban)
        out_ids[b, t] = v
        out_lp[b, t] = np.float64(logits[b, v]) - lse[b]
        tok[b] = v
        if stop and v == eos:
            done[b] = True
        else:
            all_done = False
    return all_done


@njit(**FAST)
def _step_scratch(hbuf, cbuf, scratch, n, nblk):
    """Scratch of a decoding loop over n rows: (acc for stack_step, bmax, bsum, lse for head_lse)."""
    acc = np.empty((max(cbuf.shape[3], hbuf.shape[3], scratch.shape[2]), 2, 4, 5), F32)
    return acc, np.empty((n, nblk), F32), np.empty((n, nblk), F32), np.empty(n)


@njit(**FAST)
def decode_rows(net, hbuf, cbuf, scratch, cur, tok, par, n, t0, steps, nblk, min_new, eos, stop,
                sample, temperature, top_k, top_p, rng, done, out_ids, out_lp):
    """Greedy or sampled decoding of n rows for up to ``steps`` tokens starting at step t0.

    Row b starts from token tok[b] and state row par[b] of half ``cur``; afterwards par is the identity.
    Returns (the step after the last one run, the half holding the state).
    """
    head_w, head_b = net[10], net[11]
    K = head_w.shape[0]
    L = hbuf.shape[1]
    acc, bmax, bsum, lse = _step_scratch(hbuf, cbuf, scratch, n, nblk)
    logits = np.empty((n, K), F32)
    e, idx = np.empty(K, F32), np.empty(K, np.int64)
    ident = np.arange(n)
    t = t0
    while t < t0 + steps:
        stack_step(net, hbuf, cbuf, scratch, acc, cur, tok, par, ident, n)
        cur = 1 - cur
        par[:n] = ident
        head_lse(head_w, net[13], head_b, hbuf[cur, L - 1], ident, n, nblk, logits, bmax, bsum, lse)
        all_done = pick_rows(logits, lse, n, t, min_new, eos, stop, sample, temperature, top_k, top_p, rng,
                             done, tok, out_ids, out_lp, e, idx)
        t += 1
        if all_done:
            break
    return t, cur


@njit(**FAST)
def step_log_probs(net, hbuf, cbuf, scratch, tok, n, nblk, out):
    """Model.step for rows b < n: token tok[b] on state row b of half 0 (the new state goes to half 1), then
    the next token's log-probabilities into out (R, K), float32 like the layers' path."""
    acc, bmax, bsum, lse = _step_scratch(hbuf, cbuf, scratch, n, nblk)
    ident = np.arange(n)
    stack_step(net, hbuf, cbuf, scratch, acc, 0, tok, ident, ident, n)
    head_lse(net[10], net[13], net[11], hbuf[1, hbuf.shape[1] - 1], ident, n, nblk, out, bmax, bsum, lse)
    for b in range(n):
        ob, s = out[b], F32(lse[b])
        for v in range(ob.shape[0]):
            ob[v] -= s


@njit(**FAST)
def _gang_scratch(net, hbuf, n):
    """A gang member's own scratch for _gang_forward: (z, o, x0, zeros, ident)."""
    table, isz, emb = net[6], net[4], net[9]
    P = hbuf.shape[3]
    kmax = 0
    for l in range(hbuf.shape[1]):
        kmax = max(kmax, isz[l] + P)
    z = np.empty(n * kmax, F32)  # this member's copy of the rows a layer's panels multiply
    o = np.empty((max(n, 5), 64), F32)
    x0 = np.empty((n, 0 if table.shape[0] > 0 else emb.shape[1]), F32)
    return z, o, x0, np.zeros(n, np.int64), np.arange(n)


@njit(inline="always", **FAST)
def _gang_forward(net, hbuf, cbuf, cur, tok, par, n, nblk, logits, bmax, bsum, acc, scratch, counters, phase, me,
                  members):
    """One step of every layer and of the head for rows b < n (token tok[b], state row par[b] of half cur),
    run by each member of a gang: the members share each layer's panels and the head's blocks through
    ``counters`` row ``phase`` onwards and meet after each. Returns the next free phase."""
    table, bias, w, woff, isz, Hp, head_w, head_t, head_b = (net[6], net[5], net[2], net[3], net[4], net[12],
                                                             net[10], net[13], net[11])
    z, o, x0, zeros, ident = scratch
    L = hbuf.shape[1]
    P = hbuf.shape[3]
    npan = Hp // 16
    nxt = 1 - cur
    for l in range(L):
        wt = w[woff[l]:woff[l + 1]].reshape((npan, isz[l] + P, 64))
        if l == 0 and table.shape[0] == 0:
            for b in range(n):
                x0[b] = net[9][tok[b]]
        x = x0[:n] if l == 0 else hbuf[nxt, l - 1]
        zl = z[:n * (isz[l] + P)].reshape((n, isz[l] + P))  # contiguous: the panels take its row stride
        _rows_in(x, hbuf[cur, l], par, n, zl)
        pre, prow = (table, tok) if l == 0 and table.shape[0] > 0 else (bias[l], zeros)
        k = take(counters, phase, me, members, npan)
        while k >= 0:
            _cells_t_panel(k, wt, pre, prow, zl, cbuf[cur, l], par, n, cbuf[nxt, l], hbuf[nxt, l], o)
            finish(counters, phase, members)
            k = take(counters, phase, me, members, npan)
        wait_all(counters, phase, members, npan)
        phase += 1
    f = hbuf[nxt, L - 1]
    k = take(counters, phase, me, members, nblk)
    while k >= 0:
        _head_block(k, head_w, head_t, head_b, f, ident, n, nblk, acc, logits, bmax, bsum)
        finish(counters, phase, members)
        k = take(counters, phase, me, members, nblk)
    wait_all(counters, phase, members, nblk)
    return phase + 1


@njit(**FAST)
def decode_rows_gang(net, hbuf, cbuf, cur, tok, par, n, t0, steps, nblk, min_new, eos, stop, sample,
                     temperature, top_k, top_p, rng, done, out_ids, out_lp, logits, bmax, bsum, acc, ctl,
                     counters, me, members):
    """decode_rows for a plain LSTM in panels (net Hp > 0, head_t not empty), run by every member of a gang
    (gang.py) instead of a Numba parallel region per layer and head (_gang_forward); after each step one
    member computes the log-sum-exp and picks the tokens (rng draws included) while the others wait. Its
    waits spin, so the cores never sleep between steps: after 0.2 s idle, TBB's workers, woken for every
    region, took a 2-thread greedy run from 47 to 57-72 us per token.

    Shared scratch: logits (n, K), bmax, bsum (n, nblk), acc (nblk, max(n, 5), 64), ctl (steps,) int64 zeros,
    ctl[s] set when every row is done after step t0 + s (one flag per step: a member that lags a step
    behind, which block sharing allows, still reads its own step's flag); counters
    gang.new_counters(steps * (L + 2), members). Every member returns the same (the step after the last
    one run, the half holding the state).
    """
    head_w = net[10]
    scratch = _gang_scratch(net, hbuf, n)
    ident = scratch[4]
    lse = np.empty(n)
    e, idx = np.empty(head_w.shape[0], F32), np.empty(head_w.shape[0], np.int64)
    phase = 0
    t = t0
    while t < t0 + steps:
        phase = _gang_forward(net, hbuf, cbuf, cur, tok, par, n, nblk, logits, bmax, bsum, acc, scratch, counters,
                              phase, me, members)
        if me == 0:  # the caller picks (its rng is the one whose state the caller's Generator keeps)
            par[:n] = ident
            _lse(bmax, bsum, n, nblk, lse)
            ctl[t - t0] = pick_rows(logits, lse, n, t, min_new, eos, stop, sample, temperature, top_k, top_p, rng,
                                    done, tok, out_ids, out_lp, e, idx)
            fill_rows(net, tok, n)  # the caller filled the first step's rows
            finish(counters, phase, members)
        wait_all(counters, phase, members, 1)
        phase += 1
        cur = 1 - cur
        t += 1
        if ctl[t - 1 - t0]:
            break
    return t, cur


# --------------------------------------------------------------------------- beam search

@njit(parallel=True, **FAST)
def block_candidates(logits, base, n, ban, nblk, cs, ci, cnt):
    """Per vocabulary block, the best C = cs.shape[1] of base[b] + logits[b, v] over rows b < n,
    v != ban, sorted by score, then by flat index b * K + v (ties keep the lower index)."""
    for blk in prange(nblk):
        _block_candidates(blk, logits, base, n, ban, nblk, cs, ci, cnt)


@njit(inline="always", **FAST)
def _block_candidates(blk, logits, base, n, ban, nblk, cs, ci, cnt):
    """Block blk of block_candidates."""
    K = logits.shape[1]
    C = cs.shape[1]
    lo, hi = blk * K // nblk, (blk + 1) * K // nblk
    m = 0
    for b in range(n):
        bb = base[b]
        lb = logits[b]
        for v in range(lo, hi):
            s = bb + lb[v]
            if v == ban or (m == C and s <= cs[blk, C - 1]):
                continue
            i = min(m, C - 1)
            while i > 0 and cs[blk, i - 1] < s:
                cs[blk, i] = cs[blk, i - 1]
                ci[blk, i] = ci[blk, i - 1]
                i -= 1
            cs[blk, i] = s
            ci[blk, i] = b * K + v
            m = min(m + 1, C)
    cnt[blk] = m


@njit(**FAST)
def _better(s1, i1, s2, i2):
    return s1 > s2 or (s1 == s2 and i1 < i2)


@njit(**FAST)
def merge_candidates(cs, ci, cnt, ms, mi):
    """Merge the blocks' lists into the best C overall, same order. Returns how many."""
    C = ms.shape[0]
    m = 0
    for blk in range(cs.shape[0]):
        for r in range(cnt[blk]):
            s, fi = cs[blk, r], ci[blk, r]
            if m == C and not _better(s, fi, ms[C - 1], mi[C - 1]):
                break  # this block's later entries are worse still
            i = min(m, C - 1)
            while i > 0 and _better(s, fi, ms[i - 1], mi[i - 1]):
                ms[i] = ms[i - 1]
                mi[i] = mi[i - 1]
                i -= 1
            ms[i] = s
            mi[i] = fi
            m = min(m + 1, C)
    return m


@njit(**FAST)
def add_finished(fin_score, fin_lp, fin_t, fin_b, fin_end, fcount, score, lp, t, b, ended):
    """Keep the best N = fin_score.shape[0] finished hypotheses, sorted by score (earlier first on ties)."""
    N = fin_score.shape[0]
    m = fcount[0]
    if m == N and score <= fin_score[N - 1]:
        return
    i = min(m, N - 1)
    while i > 0 and fin_score[i - 1] < score:
        fin_score[i], fin_lp[i], fin_t[i] = fin_score[i - 1], fin_lp[i - 1], fin_t[i - 1]
        fin_b[i], fin_end[i] = fin_b[i - 1], fin_end[i - 1]
        i -= 1
    fin_score[i], fin_lp[i], fin_t[i], fin_b[i], fin_end[i] = score, lp, t, b, ended
    fcount[0] = min(m + 1, N)


@njit(**FAST)
def beam_update(logits, lse, live, n, t, beam, max_new, min_new, eos, stop, alpha, nblk,
                hist, back, fin_score, fin_lp, fin_t, fin_b, fin_end, fcount):
    """One beam step after the model scored the n live beams: logits (R, K), lse (R,).

    live (beam,) float64 holds the live beams' summed log-probs, best first; it is replaced by the
    new beams'. hist[t, i] / back[t, i] receive new beam i's token and parent slot. Candidates are the
    best 2 * beam (beam, token) pairs; one ending in eos (when ``stop``) finishes if it ranks within
    the first ``beam``; the others fill the new beams. A hypothesis' score is log_prob / length**alpha,
    its length counting the eos. Returns (new live count, whether the search is over: at max_new, no
    live beam left, or the N = fin_score.shape[0] best finished cannot be beaten by a live beam).
    """
    base = np.empty(n)
    for b in range(n):
        base[b] = live[b] - lse[b]
    ban = eos if (eos >= 0 and t < min_new) else -1
    C = 2 * beam
    cs, ci, cnt = np.empty((nblk, C)), np.empty((nblk, C), np.int64), np.empty(nblk, np.int64)
    block_candidates(logits, base, n, ban, nblk, cs, ci, cnt)
    return beam_select(cs, ci, cnt, logits.shape[1], live, t, beam, max_new, eos, stop, alpha, hist, back,
                       fin_score, fin_lp, fin_t, fin_b, fin_end, fcount)


@njit(**FAST)
def beam_select(cs, ci, cnt, K, live, t, beam, max_new, eos, stop, alpha, hist, back, fin_score, fin_lp, fin_t,
                fin_b, fin_end, fcount):
    """The rest of beam_update once each vocabulary block (K tokens in all) has its candidates cs, ci, cnt
    (block_candidates, with C = 2 * beam columns)."""
    C = 2 * beam
    ms, mi = np.empty(C), np.empty(C, np.int64)
    mc = merge_candidates(cs, ci, cnt, ms, mi)
    nl = 0
    for r in range(mc):
        b, v = mi[r] // K, mi[r] % K
        if stop and v == eos:
            if r < beam:
                add_finished(fin_score, fin_lp, fin_t, fin_b, fin_end, fcount, ms[r] / (t + 1.0) ** alpha,
                             ms[r], t, b, True)
        elif nl < beam:
            hist[t, nl] = v
            back[t, nl] = b
            live[nl] = ms[r]
            nl += 1
        if nl == beam and r >= beam - 1:
            break
    N = fin_score.shape[0]
    if nl == 0:
        return 0, True
    if t + 1 == max_new:
        for i in range(nl):
            add_finished(fin_score, fin_lp, fin_t, fin_b, fin_end, fcount, live[i] / (t + 1.0) ** alpha,
                         live[i], t, i, False)
        return nl, True
    if fcount[0] < N:
        return nl, False
    # The best any live beam can still score: its log-prob only falls, so with alpha > 0 the longest
    # length is its best case, with alpha <= 0 the shortest (one more token).
    longest = max_new if alpha > 0 else t + 2.0
    return nl, live[0] / longest ** alpha <= fin_score[N - 1]


@njit(**FAST)
def trace(hist, back, t, b, out):
    """Tokens of beam slot b after step t into out[:t + 1], following back-pointers."""
    for s in range(t, -1, -1):
        out[s] = hist[s, b]
        b = back[s, b]


@njit(**FAST)
def beam_search(net, hbuf, cbuf, scratch, cur, tok0, beam, max_new, min_new, eos, stop, alpha, nblk,
                hist, back, fin_score, fin_lp, fin_t, fin_b, fin_end, fcount):
    """Beam search from state row 0 of half ``cur`` and input token tok0; see beam_update."""
    head_w, head_b = net[10], net[11]
    K = head_w.shape[0]
    L = hbuf.shape[1]
    acc, bmax, bsum, lse = _step_scratch(hbuf, cbuf, scratch, beam, nblk)
    ident = np.arange(beam)
    logits = np.empty((beam, K), F32)
    live = np.zeros(beam)
    tok, par = np.zeros(beam, np.int64), np.zeros(beam, np.int64)
    tok[0] = tok0
    n = np.int64(1)  # not a literal: one compiled stack_step serves both loops
    for t in range(max_new):
        stack_step(net, hbuf, cbuf, scratch, acc, cur, tok, par, ident, n)
        cur = 1 - cur
        head_lse(head_w, net[13], head_b, hbuf[cur, L - 1], ident, n, nblk, logits, bmax, bsum, lse)
        n, over = beam_update(logits, lse, live, n, t, beam, max_new, min_new, eos, stop, alpha, nblk,
                              hist, back, fin_score, fin_lp, fin_t, fin_b, fin_end, fcount)
        if over:
            break
        tok[:n] = hist[t, :n]
        par[:n] = back[t, :n]


@njit(**FAST)
def beam_search_gang(net, hbuf, cbuf, cur, beam, max_new, min_new, eos, stop, alpha, nblk, hist, back, fin_score,
                     fin_lp, fin_t, fin_b, fin_end, fcount, tok, par, live, logits, bmax, bsum, acc, cs, ci, cnt, ctl,
                     counters, me, members):
    """beam_search on a gang, for the models decode_rows_gang takes: every member runs the layers and the
    head (_gang_forward) and a share of the vocabulary blocks' candidates, then one member selects the new
    beams while the others wait. The caller sets tok[0] and par[0] (state row) before the members start: no
    member writes shared state before the first step is done.

    Shared: tok, par (beam,) int64; live (beam,) float64 zeros; logits (beam, K), bmax, bsum (beam, nblk);
    acc (nblk, max(beam, 5), 64); cs (nblk, 2 * beam) float64, ci (nblk, 2 * beam) int64, cnt (nblk,) int64;
    ctl (max_new, 2) int64: after step t the live count and whether the search is over (a slot per step,
    as in decode_rows_gang); counters gang.new_counters(max_new * (L + 3), members).
    """
    K = logits.shape[1]
    scratch = _gang_scratch(net, hbuf, beam)
    lse, base = np.empty(beam), np.empty(beam)
    phase = 0
    n = np.int64(1)
    for t in range(max_new):
        phase = _gang_forward(net, hbuf, cbuf, cur, tok, par, n, nblk, logits, bmax, bsum, acc, scratch, counters,
                              phase, me, members)
        _lse(bmax, bsum, n, nblk, lse)  # every member: its candidate blocks need base
        for b in range(n):
            base[b] = live[b] - lse[b]
        ban = eos if (eos >= 0 and t < min_new) else -1
        k = take(counters, phase, me, members, nblk)
        while k >= 0:
            _block_candidates(k, logits, base, n, ban, nblk, cs, ci, cnt)
            finish(counters, phase, members)
            k = take(counters, phase, me, members, nblk)
        wait_all(counters, phase, members, nblk)
        phase += 1
        if me == 0:  # the others have read live, tok and par for this step: all phases before are done
            nl, over = beam_select(cs, ci, cnt, K, live, t, beam, max_new, eos, stop, alpha, hist, back, fin_score,
                                   fin_lp, fin_t, fin_b, fin_end, fcount)
            if not over:
                tok[:nl] = hist[t, :nl]
                par[:nl] = back[t, :nl]
                fill_rows(net, tok, nl)
            ctl[t, 0] = nl
            ctl[t, 1] = over
            finish(counters, phase, members)
        wait_all(counters, phase, members, 1)
        phase += 1
        cur = 1 - cur
        if ctl[t, 1]:
            break
        n = ctl[t, 0]
