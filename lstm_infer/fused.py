"""Fused LSTM steps: the recurrent product and the gate update in one pass over a thread's hidden units.

The per-step path used to run three things: OpenBLAS's W_hh @ h (it re-packs W_hh on every call, and its
threads spin for milliseconds after each call, taking the core that Numba's next region wants), a gate
kernel, and a commit. Here the thread that owns a share of the hidden units computes the recurrent sums
of its units' four gate rows and applies the gates straight away; W_hh stays in the layout the model
directory stores (gate g of unit j is row g*H + j), and nothing but the new h and c is written. The
threads form a gang (gang.py) that runs a whole chunk of steps, sharing each step's blocks of units
through atomic counters: batch-1 steps of 512 units went from 37 to 25 us on 2 threads against a Numba
parallel region per step.

Two layouts, by batch size:
- panel (B > 8): the state is feature-major, h^T (H, Bp) with Bp = B rounded up to 16, so a step's
  product is rows of W_hh times h^T, computed by the register-tiled IR micro-kernel in simd.py
  (~100% of one core's sgemm peak). Padding columns hold finite junk that never mixes with real rows.
- dot (B <= 8): h is batch-major (B, H) and each unit's four rows are dotted with four rows of h at a
  time (_dot4x4); padding a batch of 1 to 16 columns would waste 15/16 of the arithmetic.

Shapes: n steps, B batch rows, H hidden units (no projection: P = H), G = 4H.
``tests/naive.py`` holds the NumPy twin (naive.lstm_steps); tests/test_fused.py compares them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .gang import finish, take, wait_all
from .kernels import FAST, _clip, fsigmoid, ftanh
from .simd import LANES, SMALL_ROWS, rows_gemm, rows_gemm2, small_rows

_ZERO, _ONE = np.float32(0.0), np.float32(1.0)
PANEL_MIN_BATCH = 9  # batches from this size take the panel layout


@njit(inline="always", **FAST)
def dot4x4(w0, w1, w2, w3, x0, x1, x2, x3):
    """The 16 dot products w_r . x_q, all (K,), as a flat tuple (r major): every weight loaded feeds
    four FMAs, so four rows (batch rows, beams, samples) cost about what one does while weights stream in."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = _ZERO
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = _ZERO
    for k in range(w0.shape[0]):
        v0, v1, v2, v3 = x0[k], x1[k], x2[k], x3[k]
        u = w0[k]
        s00 += u * v0
        s01 += u * v1
        s02 += u * v2
        s03 += u * v3
        u = w1[k]
        s10 += u * v0
        s11 += u * v1
        s12 += u * v2
        s13 += u * v3
        u = w2[k]
        s20 += u * v0
        s21 += u * v1
        s22 += u * v2
        s23 += u * v3
        u = w3[k]
        s30 += u * v0
        s31 += u * v1
        s32 += u * v2
        s33 += u * v3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@njit(inline="always", **FAST)
def dot4x1(w0, w1, w2, w3, x):
    """The 4 dot products w_r . x, all (K,)."""
    s0 = s1 = s2 = s3 = _ZERO
    for k in range(w0.shape[0]):
        v = x[k]
        s0 += w0[k] * v
        s1 += w1[k] * v
        s2 += w2[k] * v
        s3 += w3[k] * v
    return s0, s1, s2, s3


@njit(**FAST)
def _gates(gx, peep, has_peep, clip, input_forget, c, acc, j0, j1):
    """Gates of units j0 .. j1: gx (4H, N) with the bias, c (H, N), acc (4, H, N) the recurrent sums.

    Leaves y = o * tanh(c') in acc[0] and c' in acc[1] (c itself is left to the caller's mask). The
    loop runs over the whole block as four flat runs: LLVM's vectorised loop takes 64 elements a turn,
    so a loop over one unit's 32 rows would fall through to its scalar remainder.
    """
    H, N = c.shape
    n = (j1 - j0) * N
    xi, xf = gx[j0:j1].reshape(n), gx[H + j0:H + j1].reshape(n)
    xg, xo = gx[2 * H + j0:2 * H + j1].reshape(n), gx[3 * H + j0:3 * H + j1].reshape(n)
    ai, af = acc[0, j0:j1].reshape(n), acc[1, j0:j1].reshape(n)
    ag, ao = acc[2, j0:j1].reshape(n), acc[3, j0:j1].reshape(n)
    cf = c[j0:j1].reshape(n)
    if has_peep:  # input and forget gates see c(t-1), the output gate c(t)
        for q in range(n):
            u = j0 + q // N
            cp = cf[q]
            i = fsigmoid(_clip(xi[q] + ai[q] + peep[0, u] * cp, clip))
            f = _ONE - i if input_forget else fsigmoid(_clip(xf[q] + af[q] + peep[1, u] * cp, clip))
            cn = f * cp + i * ftanh(_clip(xg[q] + ag[q], clip))
            ai[q] = fsigmoid(_clip(xo[q] + ao[q] + peep[2, u] * cn, clip)) * ftanh(cn)
            af[q] = cn
    else:
        for q in range(n):
            i = fsigmoid(_clip(xi[q] + ai[q], clip))
            f = _ONE - i if input_forget else fsigmoid(_clip(xf[q] + af[q], clip))
            cn = f * cf[q] + i * ftanh(_clip(xg[q] + ag[q], clip))
            ai[q] = fsigmoid(_clip(xo[q] + ao[q], clip)) * ftanh(cn)
            af[q] = cn


@njit(**FAST)
def _dot_block(gx, w_hh, peep, has_peep, clip, input_forget, valid, hp, hn, c, out, acc, j0, j1):
    """Dot layout, units j0 .. j1: gx (4H, B), hp, hn (B, H), c (H, B), out (B, H), acc (4, H, B)."""
    H, B = c.shape
    for j in range(j0, j1):
        w0, w1, w2, w3 = w_hh[j], w_hh[H + j], w_hh[2 * H + j], w_hh[3 * H + j]
        a0, a1, a2, a3 = acc[0, j], acc[1, j], acc[2, j], acc[3, j]
        b0 = 0
        while b0 + 4 <= B:
            s = dot4x4(w0, w1, w2, w3, hp[b0], hp[b0 + 1], hp[b0 + 2], hp[b0 + 3])
            a0[b0], a0[b0 + 1], a0[b0 + 2], a0[b0 + 3] = s[0], s[1], s[2], s[3]
            a1[b0], a1[b0 + 1], a1[b0 + 2], a1[b0 + 3] = s[4], s[5], s[6], s[7]
            a2[b0], a2[b0 + 1], a2[b0 + 2], a2[b0 + 3] = s[8], s[9], s[10], s[11]
            a3[b0], a3[b0 + 1], a3[b0 + 2], a3[b0 + 3] = s[12], s[13], s[14], s[15]
            b0 += 4
        for b in range(b0, B):
            a0[b], a1[b], a2[b], a3[b] = dot4x1(w0, w1, w2, w3, hp[b])
    _gates(gx, peep, has_peep, clip, input_forget, c, acc, j0, j1)
    _commit_rows(acc, valid, hp, hn, c, out, j0, j1)


@njit(inline="always", **FAST)
def _commit_rows(acc, valid, hp, hn, c, out, j0, j1):
    """Units j0 .. j1 of a batch-major step (dot layout): y = acc[0] and c' = acc[1] (_gates) into
    hn, out (B, H) and c (H, B). The mask and the strided stores of h stay out of the vectorised loop."""
    B = hp.shape[0]
    full = True
    for b in range(B):
        full &= valid[b]
    if full:  # flat copies: 1.47 us per 512-unit batch-1 step, the per-unit loop with its branch 2.96
        n = (j1 - j0) * B
        cf, cnf, yf = c[j0:j1].reshape(n), acc[1, j0:j1].reshape(n), acc[0, j0:j1].reshape(n)
        for q in range(n):  # loops, not slice assignment (see _panel_block)
            cf[q] = cnf[q]
        if B == 1:
            h0, o0 = hn[0], out[0]
            for q in range(n):
                h0[j0 + q] = yf[q]
                o0[j0 + q] = yf[q]
        else:
            for b in range(B):
                hb, ob = hn[b], out[b]
                for j in range(j0, j1):
                    hb[j] = ob[j] = yf[(j - j0) * B + b]
        return
    for j in range(j0, j1):
        yj, cnj, cj = acc[0, j], acc[1, j], c[j]
        for b in range(B):
            if valid[b]:  # a row past its length keeps its state and emits zeros
                cj[b] = cnj[b]
                hn[b, j] = yj[b]
                out[b, j] = yj[b]
            else:
                hn[b, j] = hp[b, j]
                out[b, j] = _ZERO


@njit(**FAST)
def _row_block(gx, wp, peep, has_peep, clip, input_forget, valid, hp, hn, c, out, sums, p0, p1):
    """Row layout (batch 1), panels p0 .. p1 of wp (Hp/16, H, 64), i.e. units 16 p0 .. min(16 p1, H): gx
    (4H, 1), hp, hn, out (1, H), c (H, 1), sums (Hp/16, 64) scratch. Panel p's column g*16 + l holds
    gate g of unit 16 p + l (row_panels): h times a panel is one broadcast and four FMAs per k, with the
    panel read front to back, no horizontal sums (simd.small_rows). The sums stay as the panels leave
    them, and _panel_gates then takes each panel's units and writes h and c at once."""
    H = c.shape[0]
    for p in range(p0, p1):
        small_rows(1, hp.ctypes.data, H, wp[p].ctypes.data, 64, H, sums[p].ctypes.data, 64)
    gf, cf, hpf, hnf, of = gx.reshape(4 * H), c.reshape(H), hp.reshape(H), hn.reshape(H), out.reshape(H)
    for p in range(p0, p1):
        _panel_gates(gf, sums[p], peep, has_peep, clip, input_forget, valid[0], hpf, hnf, cf, of, 16 * p)


@njit(inline="always", **FAST)
def _panel_gates(gf, sp, peep, has_peep, clip, input_forget, ok, hpf, hnf, cf, of, j0):
    """The gates of a row-layout panel's units j0 .. j0 + 16 (fewer at the end of H), from its sums sp (64,)
    (gate g of unit j0 + l at g*16 + l) and gf (4H,), the inputs with the bias; then c' into cf, y into hnf
    and of, all (H,); a step past the row's length (not ok) keeps h and c and emits zeros.

    _gates' math, written again over the panel's own layout: one vector per gate, a trip count of 16 that
    LLVM vectorises whole. Copying the sums into gate-major rows for _gates instead, a 512-unit step took
    27.0-37.4 against 26.1-34.1 us (random weights, 2 threads, three runs alternating both as the host's load
    went), and the bundled model's stream 31.5-34.3 against 30.9-32.2 us per token; _gates' loop called on 16
    elements at a time (its vectorised body takes 64) took 30.7 us per step."""
    H = cf.shape[0]
    m = min(16, H - j0)
    if m == 16 and not has_peep:  # the common case, with the literal trip count
        xi, xf = gf[j0:j0 + 16], gf[H + j0:H + j0 + 16]
        xg, xo = gf[2 * H + j0:2 * H + j0 + 16], gf[3 * H + j0:3 * H + j0 + 16]
        cp = cf[j0:j0 + 16]
        for q in range(16):
            i = fsigmoid(_clip(xi[q] + sp[q], clip))
            f = _ONE - i if input_forget else fsigmoid(_clip(xf[q] + sp[16 + q], clip))
            cn = f * cp[q] + i * ftanh(_clip(xg[q] + sp[32 + q], clip))
            sp[q] = fsigmoid(_clip(xo[q] + sp[48 + q], clip)) * ftanh(cn)
            sp[16 + q] = cn
    else:
        for q in range(m):
            j = j0 + q
            c0 = cf[j]
            pi, pf, po = (peep[0, j], peep[1, j], peep[2, j]) if has_peep else (_ZERO, _ZERO, _ZERO)
            i = fsigmoid(_clip(gf[j] + sp[q] + pi * c0, clip))
            f = _ONE - i if input_forget else fsigmoid(_clip(gf[H + j] + sp[16 + q] + pf * c0, clip))
            cn = f * c0 + i * ftanh(_clip(gf[2 * H + j] + sp[32 + q], clip))
            sp[q] = fsigmoid(_clip(gf[3 * H + j] + sp[48 + q] + po * cn, clip)) * ftanh(cn)
            sp[16 + q] = cn
    for q in range(m):
        j = j0 + q
        if ok:
            cf[j] = sp[16 + q]
            hnf[j] = of[j] = sp[q]
        else:
            hnf[j] = hpf[j]
            of[j] = _ZERO


@njit(**FAST)
def _panel_block(gx, w_hh, w_ih, xt, peep, has_peep, clip, input_forget, valid, hp, hn, c, out, fm, acc, j0, j1):
    """Panel layout, units j0 .. j1 (at least 8; rows_gemm writes only rows j0 .. j1 of acc): gx (4H, Bp),
    hp, hn, c (H, Bp), acc (4, H, Bp); valid (B,) covers the real rows. With w_ih (4H, I), I > 0, the
    step adds the input product itself, W_ih xt for xt (I, Bp), and gx holds only the bias. out is
    (B, H), or (H, Bp) feature-major when ``fm`` (rows past their length zero, padding columns finite)."""
    H, N = c.shape
    B = valid.shape[0]
    fused_in = w_ih.shape[1] > 0
    for g in range(4):
        if fused_in:
            rows_gemm2(w_ih, xt, w_hh, hp, g * H + j0, g * H + j1, acc[g], j0)
        else:
            rows_gemm(w_hh, g * H + j0, g * H + j1, hp, acc[g], j0, False)
    _gates(gx, peep, has_peep, clip, input_forget, c, acc, j0, j1)
    full = True
    for b in range(B):
        full &= valid[b]
    n = (j1 - j0) * N
    yf, cnf = acc[0, j0:j1].reshape(n), acc[1, j0:j1].reshape(n)
    if full:  # the common case: whole rows copy, and vectorise
        cf, hf = c[j0:j1].reshape(n), hn[j0:j1].reshape(n)
        if fm:
            of = out[j0:j1].reshape(n)
            for q in range(n):  # a loop, not cf[:] = ...: Numba compiles slice assignment with a shape error
                cf[q] = cnf[q]
                hf[q] = yf[q]
                of[q] = yf[q]
        else:
            for q in range(n):
                cf[q] = cnf[q]
                hf[q] = yf[q]
    else:
        for j in range(j0, j1):
            yj, cnj, cj, hnj, hpj = acc[0, j], acc[1, j], c[j], hn[j], hp[j]
            for b in range(B):  # a row past its length keeps its state and emits zeros
                ok = valid[b]
                cj[b] = cnj[b] if ok else cj[b]
                hnj[b] = yj[b] if ok else hpj[b]
            if fm:
                oj = out[j]
                for b in range(N):
                    oj[b] = yj[b] if b >= B or valid[b] else _ZERO
    if not fm:
        y = acc[0]
        for b in range(B):
            ob = out[b]
            if valid[b]:
                for j in range(j0, j1):
                    ob[j] = y[j, b]
            else:
                for j in range(j0, j1):
                    ob[j] = _ZERO


def unit_block(B: int, H: int) -> int:
    """Hidden units per block: at least 8 (a panel tile), at most 512 / B (a block's gate loop spans ~512
    elements), and at most H / 4, so that a gang of 2 can even out a late member. (H / 8 cost a batch-1
    step ~3% in counter traffic: 8 blocks' atomics per step.)"""
    return max(1, min(H, max(8, min(-(-512 // B), -(-H // 4)))))


def blocks(H: int, U: int, panel: bool) -> int:
    """Blocks of (about) U units in a step. Panel blocks have at least 8 units: the last takes the H % U
    leftover, because a panel tile re-runs rows of its own block to cover a short tail and a block of
    fewer than 8 units would write into its neighbour's rows."""
    return max(1, H // U) if panel else -(-H // U)


@njit(inline="always", **FAST)
def _block(k, nblk, U, H, panel):
    """Units [j0, j1) of block k (see blocks())."""
    if panel:
        return k * U, (H if k == nblk - 1 else k * U + U)
    return k * U, min(H, k * U + U)


def members(threads: int, n: int, B: int, H: int, panel: bool) -> int:
    """Gang size for n steps of B rows of H units; 0: a Numba parallel region per step instead (the _regions
    loops). One thread for steps too small to split (a 37-unit batch-1 step is ~1 us). A chunk too short
    to pay for handing work to another thread (20-50 us through the pool, more on a busy host), such as
    the step API's single step, takes the regions (5-10 us each)."""
    if threads == 1 or B * H * H < 1 << 16:
        return 1
    if n * B * H * H < 1 << 20:
        return 0
    N = -(-B // LANES) * LANES if panel else B  # layout()'s columns
    return max(1, min(threads, blocks(H, unit_block(N, H), panel)))


@njit(**FAST)
def _gather_units(table, columns, ids, gx, j0, j1):
    """gx[g*H + j, b] = layer 0's input projection of token ids[b] (W_ih emb + bias, a token_table row)
    for units j0 .. j1 of each gate: table (4H, V) when ``columns``, else (V, 4H); ids (B,); gx (4H, >= B)."""
    H = gx.shape[0] // 4
    B = ids.shape[0]
    for g in range(4):
        for r in range(g * H + j0, g * H + j1):
            gr = gx[r]
            if columns:
                tr = table[r]
                for b in range(B):
                    gr[b] = tr[ids[b]]
            else:
                for b in range(B):
                    gr[b] = table[ids[b], r]


# The step loops, one per layout: with both blocks inlined behind a branch in one loop body, the panel
# steps ran 30% slower (193 vs 150 us per step, H=512, B=32, 2 threads). Every member ``me`` of a gang
# (gang.py) runs the loop, taking blocks of U units (unit_block, blocks()) from ``counters``
# (gang.new_counters(n, members)) until the step has none left, then waiting for the step to finish: the
# next step reads all of h.
# Arguments: gx (n, 4H, N) input projections with the bias (kernels.gather_steps); w_hh (4H, H);
# w_ih (4H, I) and x (n, I, N): panel layout with I > 0 only, the step computes W_ih x[t] itself and gx is
# (1, 4H, N), the bias alone (an empty (4H, 0) w_ih and (1, 0, N) x otherwise); peep (3, H) read only when
# has_peep; clip float32 (BIG: none); valid (n, B) bool; reverse: run t = n-1 .. 0; hbuf (2, B, H) (dot)
# or (2, H, N) (panel); c (H, N); out (n, B, H) receives each step's h (zeros on rows past their length),
# or (n, H, N) feature-major when fm (panel only); acc (4, H, N) scratch.
# Panel layout with a layer-0 token table (table.shape[0] > 0; an empty (0, 0) array otherwise): gx is one
# step's (1, 4H, N) scratch instead, and whoever takes a block copies its units' rows for tokens ids (n, B)
# into it just before using them (_gather_units), so they stay in L1; a gather of the whole chunk
# beforehand wrote 256 KB per step (B=32, H=512) out to L3 and read it back: 2.7-3 ms of a bundled-model
# batch, which went from 29.7 to 28.5 ms.
# hbuf[0] holds h before the first step run and the halves alternate: the final h is in hbuf[n % 2]. A
# block of step s writes hbuf[(s+1) % 2], which step s - 1 read: every block of it had finished.

@njit(**FAST)
def lstm_steps_panel(gx, w_hh, w_ih, x, peep, has_peep, clip, input_forget, valid, reverse, hbuf, c, out, fm,
                     acc, table, columns, ids, U, counters, me, members):
    n = valid.shape[0]
    H = c.shape[0]
    nblk = max(1, H // U)
    tok = table.shape[0] > 0
    fused_in = w_ih.shape[1] > 0
    for s in range(n):
        t = n - 1 - s if reverse else s
        hp, hn = hbuf[s % 2], hbuf[(s + 1) % 2]
        gt = gx[0] if tok or fused_in else gx[t]
        xt = x[t] if fused_in else x[0]
        k = take(counters, s, me, members, nblk)
        while k >= 0:
            a, b = _block(k, nblk, U, H, True)
            if tok:
                _gather_units(table, columns, ids[t], gt, a, b)
            _panel_block(gt, w_hh, w_ih, xt, peep, has_peep, clip, input_forget, valid[t], hp, hn, c, out[t], fm,
                         acc, a, b)
            finish(counters, s, members)
            k = take(counters, s, me, members, nblk)
        wait_all(counters, s, members, nblk)


@njit(**FAST)
def lstm_steps_dot(gx, w_hh, w_ih, x, peep, has_peep, clip, input_forget, valid, reverse, hbuf, c, out, fm, acc,
                   table, columns, ids, U, counters, me, members):
    """The table, w_ih, x and fm arguments are unused: the dot layout always reads a gathered gx of the
    input projection and writes out batch-major (see recurrent.py)."""
    n = gx.shape[0]
    H = c.shape[0]
    nblk = -(-H // U)
    for s in range(n):
        t = n - 1 - s if reverse else s
        hp, hn = hbuf[s % 2], hbuf[(s + 1) % 2]
        k = take(counters, s, me, members, nblk)
        while k >= 0:
            a, b = _block(k, nblk, U, H, False)
            _dot_block(gx[t], w_hh, peep, has_peep, clip, input_forget, valid[t], hp, hn, c, out[t], acc, a, b)
            finish(counters, s, members)
            k = take(counters, s, me, members, nblk)
        wait_all(counters, s, members, nblk)


@njit(**FAST)
def lstm_steps_row(gx, wp, peep, has_peep, clip, input_forget, valid, reverse, hbuf, c, out, nblk,
                   counters, me, members):
    """The dot loop's steps for a batch of one in the row layout (_row_block): gx (n, 4H, 1), wp (Hp/16, H, 64)
    (row_panels), hbuf (2, 1, H), c (H, 1), out (n, 1, H); the panels in ``nblk`` blocks of sizes differing by
    at most one (row_blocks)."""
    n = gx.shape[0]
    npan = wp.shape[0]
    sums = np.empty((npan, 64), np.float32)
    for s in range(n):
        t = n - 1 - s if reverse else s
        hp, hn = hbuf[s % 2], hbuf[(s + 1) % 2]
        k = take(counters, s, me, members, nblk)
        while k >= 0:
            _row_block(gx[t], wp, peep, has_peep, clip, input_forget, valid[t], hp, hn, c, out[t], sums,
                       k * npan // nblk, (k + 1) * npan // nblk)
            finish(counters, s, members)
            k = take(counters, s, me, members, nblk)
        wait_all(counters, s, members, nblk)


def row_panels(w: np.ndarray) -> np.ndarray:
    """Gate rows w (4H, K) -> (Hp/16, K, 64) with Hp = H rounded up to 16: panel p's row k, column g*16 + l
    holds w[g*H + 16p + l, k] (zeros past H). The row layout's copy of W_hh (K = H), and the decoder's
    [W_ih | W_hh] panels (decoding._build_net)."""
    G = 4
    H, K = w.shape[0] // G, w.shape[1]
    Hp = -(-H // LANES) * LANES
    wp = np.zeros((G, Hp, K), np.float32)
    wp[:, :H] = w.reshape(G, H, K)
    return np.ascontiguousarray(wp.reshape(G, Hp // LANES, LANES, K).transpose(1, 3, 0, 2)).reshape(Hp // LANES, K,
                                                                                                   G * LANES)


def row_blocks(H: int, members: int) -> int:
    """Blocks of a row-layout step on a gang of ``members``: one per member, the panels split evenly.

    A batch-1 step is bound by streaming W_hh out of L3, so what counts is that both halves are the same
    size and stay with their member. Blocks of unit_block(1, H) units (11, 11, 11 and 8 of the 650-unit
    model's 41 panels) left one member 3 panels more than the other; with halves a step took 41.7 instead of
    44.1 us (650 units), 26.1 / 26.7 (512), 4.8 / 5.9 (200), 391 / 397 (1500), 2 threads, one process
    alternating both. A member that starts late still loses only its block to the other (gang.take)."""
    return max(1, min(members, -(-H // LANES)))


# The same loops with a Numba parallel region per step over the blocks (members() == 0), on a gathered gx
# (n, 4H, N); the table arguments are unused.

@njit(parallel=True, **FAST)
def lstm_steps_panel_regions(gx, w_hh, w_ih, x, peep, has_peep, clip, input_forget, valid, reverse, hbuf, c, out,
                             fm, acc, table, columns, ids, U):
    n = valid.shape[0]
    H = c.shape[0]
    nblk = max(1, H // U)
    fused_in = w_ih.shape[1] > 0
    for s in range(n):
        t = n - 1 - s if reverse else s
        hp, hn = hbuf[s % 2], hbuf[(s + 1) % 2]
        gt = gx[0] if fused_in else gx[t]
        xt = x[t] if fused_in else x[0]
        for k in prange(nblk):
            a, b = _block(k, nblk, U, H, True)
            _panel_block(gt, w_hh, w_ih, xt, peep, has_peep, clip, input_forget, valid[t], hp, hn, c, out[t], fm,
                         acc, a, b)


@njit(parallel=True, **FAST)
def lstm_steps_dot_regions(gx, w_hh, w_ih, x, peep, has_peep, clip, input_forget, valid, reverse, hbuf, c, out,
                           fm, acc, table, columns, ids, U):
    n = gx.shape[0]
    H = c.shape[0]
    nblk = -(-H // U)
    for s in range(n):
        t = n - 1 - s if reverse else s
        hp, hn = hbuf[s % 2], hbuf[(s + 1) % 2]
        for k in prange(nblk):
            a, b = _block(k, nblk, U, H, False)
            _dot_block(gx[t], w_hh, peep, has_peep, clip, input_forget, valid[t], hp, hn, c, out[t], acc, a, b)


@njit(**FAST)
def project_rows(x, s, e, w_t, bias, out):
    """out[t] = x[t] @ w_t + bias for t in s .. e (at least 8 rows): x (n, I), w_t (I, G) with G a multiple
    of LANES, out (n, G). A batch-1 chunk's input projection, with W_ih^T along the vector lanes: OpenBLAS
    ran this 512 x 512 x 2048 product at 161 GFLOP/s on 2 Zen 4 cores, these tiles at 189."""
    rows_gemm(x, s, e, w_t, out, s, True)
    G = out.shape[1]
    for t in range(s, e):
        ot = out[t]
        for g in range(G):
            ot[g] += bias[g]


@njit(**FAST)
def project_tokens(emb, w_t, bias, ids, rows, cols, have):
    """Layer 0's input projection of the tokens v in ids not marked in have: rows[v] = emb[v] @ W_ih^T + bias,
    cols[:, v] = rows[v] when cols is a (G, V) table ((0, 0): none), then have[v] = True. emb (V, E), w_t
    (E, Gp) = tokens_weights(W_ih), bias (G,), ids (n,) int64, rows (V, G).

    Every value is one FMA chain over E in order (simd.small_rows), however the rows group: the same float
    whichever call fills a row first, so scoring and the decoder can share one table (decoding._build_net)
    and a text scores the same before and after a generate. Rows go before their mark, so that a reader
    who sees the mark finds the row. Callers pass ids with new tokens among them (it allocates scratch)."""
    n = ids.shape[0]
    E, Gp = w_t.shape
    G = rows.shape[1]
    x = np.empty((SMALL_ROWS, E), np.float32)
    o = np.empty((SMALL_ROWS, 64), np.float32)
    grp = np.empty(SMALL_ROWS, np.int64)
    i = 0
    while i < n:
        m = 0
        while i < n and m < SMALL_ROWS:
            v = ids[i]
            i += 1
            if not have[v]:  # a token twice in ids may be computed twice: the same values
                grp[m] = v
                x[m] = emb[v]
                m += 1
        if m == 0:
            break
        for c0 in range(0, Gp, 64):
            small_rows(m, x.ctypes.data, E, w_t.ctypes.data + c0 * 4, Gp, E, o.ctypes.data, 64)
            for r in range(m):
                rr, orow = rows[grp[r]], o[r]
                for q in range(min(64, G - c0)):
                    rr[c0 + q] = orow[q] + bias[c0 + q]
        for r in range(m):
            v = grp[r]
            if cols.shape[0] > 0:
                rv = rows[v]
                for g in range(G):
                    cols[g, v] = rv[g]
            have[v] = True


def tokens_weights(w_ih: np.ndarray) -> np.ndarray:
    """W_ih (G, E) -> W_ih^T (E, Gp) with Gp = G rounded up to 64 (zero padding), for project_tokens."""
    G, E = w_ih.shape
    w_t = np.zeros((E, -(-G // 64) * 64), np.float32)
    w_t[:, :G] = w_ih.T
    return w_t


def layout(B: int, H: int) -> tuple[bool, int]:
    """(panel, N): whether B rows of H units take the panel layout, and the state's columns N (B, or B
    rounded up to 16 for the panel layout)."""
    panel = B >= PANEL_MIN_BATCH and H >= 8
    return panel, (-(-B // LANES) * LANES if panel else B)
