"""Numba kernels: cell updates, masked state commits, fused log-softmax.

Every kernel works on float32 arrays the caller allocates; GEMMs stay in NumPy's BLAS (one BLAS in
the process, one thread pool). Shapes use B batch rows, H hidden units, P = H_out (proj or H).
Gate blocks inside a row follow the engine's order (lstm i,f,g,o; gru r,z,n), each H wide.

``tests/naive.py`` holds the plain NumPy twin of every kernel here.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .layers import BIG

# Hot kernels: fastmath lets LLVM vectorise; error_model="numpy" drops the per-division zero check.
# cache=True keeps compile time out of every process after the first.
FAST = dict(cache=True, fastmath=True, error_model="numpy", nogil=True)

# Rational tanh, float32 (the minimax form Eigen uses): within a few ulp, and it vectorises,
# where np.tanh inside @njit is a scalar libm call.
_TC = np.float32(7.90531110763549805)
_A1, _A3, _A5 = np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04), np.float32(1.48572235717979e-05)
_A7, _A9 = np.float32(5.12229709037114e-08), np.float32(-8.60467152213735e-11)
_A11, _A13 = np.float32(2.00018790482477e-13), np.float32(-2.76076847742355e-16)
_B0, _B2 = np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03)
_B4, _B6 = np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06)
_HALF, _ONE, _ZERO = np.float32(0.5), np.float32(1.0), np.float32(0.0)


@njit(inline="always", **FAST)
def ftanh(x):
    x = max(-_TC, min(_TC, x))
    x2 = x * x
    p = ((((((_A13 * x2 + _A11) * x2 + _A9) * x2 + _A7) * x2 + _A5) * x2 + _A3) * x2 + _A1) * x
    q = ((_B6 * x2 + _B4) * x2 + _B2) * x2 + _B0
    return p / q


@njit(inline="always", **FAST)
def fsigmoid(x):
    return _HALF + _HALF * ftanh(_HALF * x)


@njit(inline="always", **FAST)
def _clip(x, c):
    return max(-c, min(c, x))


@njit(cache=True, error_model="numpy")
def act_inplace(v, code, alpha, beta):
    """Apply ONNX activation ``code`` (see format.ACTIVATIONS) to v (n,) in place."""
    n = v.shape[0]
    if code == 0:
        for j in range(n):
            v[j] = fsigmoid(v[j])
    elif code == 1:
        for j in range(n):
            v[j] = ftanh(v[j])
    elif code == 2:
        for j in range(n):
            v[j] = max(v[j], _ZERO)
    elif code == 3:
        for j in range(n):
            v[j] = min(max(alpha * v[j] + beta, _ZERO), _ONE)
    elif code == 4:
        for j in range(n):
            v[j] = v[j] if v[j] >= 0 else alpha * v[j]
    elif code == 5:
        for j in range(n):
            v[j] = v[j] if v[j] > alpha else _ZERO
    elif code == 6:
        for j in range(n):
            v[j] = alpha * ftanh(beta * v[j])
    elif code == 7:
        for j in range(n):
            v[j] = alpha * v[j] + beta
    elif code == 8:
        for j in range(n):
            v[j] = v[j] if v[j] >= 0 else alpha * (np.exp(v[j]) - 1)
    elif code == 9:
        for j in range(n):
            v[j] = v[j] / (1 + abs(v[j]))
    elif code == 10:
        for j in range(n):
            x = v[j]
            v[j] = max(x, _ZERO) + np.log1p(np.exp(-abs(x)))


UNIT_BLOCK = 16  # hidden units per block of a step's gate kernel


@njit(inline="always", **FAST)
def _gather_rows(gxa, bias, out, g):
    n = out.shape[0]
    B = gxa.shape[1] // n  # out may have more columns (padding), left as they are
    bg = bias[g]
    for t in range(n):
        src, dst = gxa[g, t * B:(t + 1) * B], out[t, g]
        for b in range(B):
            dst[b] = src[b] + bg


@njit(**FAST)
def gather_steps(gxa, bias, out):
    """out[t, g, b] = gxa[g, t * B + b] + bias[g]: gxa (G, n*B), bias (G,) -> out (n, G, >= B).

    The input projection comes out of one GEMM as (G, n*B); each step's gate kernel wants its own
    (G, B) block contiguous, read front to back. Reading a step's slice of the (G, n*B) array in place
    (rows n*B*4 bytes apart) made the gate kernel 5-7x slower; this copy reads rows sequentially.
    Serial: each worker thread (workers.py) gathers its own share of the steps.
    """
    n, G = out.shape[0], out.shape[1]
    B = gxa.shape[1] // n  # out may have more columns (padding), left as they are
    for g in range(G):
        bg = bias[g]
        for t in range(n):
            src, dst = gxa[g, t * B:(t + 1) * B], out[t, g]
            for b in range(B):
                dst[b] = src[b] + bg


@njit(parallel=True, **FAST)
def gather_table_columns(table, ids, out):
    """out[t, g, b] = table[g, ids[t, b]]: table (G, V), ids (n, B) int64 -> out (n, G, >= B).

    Row g of the table stays in L1 while the batch gathers from it and out[t, g] fills front to back:
    2.3x the speed of gather_table at V = 256, but 5x slower at V = 10k, where the rows no longer fit.
    """
    n, B = ids.shape
    G = table.shape[0]
    for t in prange(n):
        ot, it = out[t], ids[t]
        for g in range(G):
            row, og = table[g], ot[g]
            for b in range(B):
                og[b] = row[it[b]]


@njit(parallel=True, **FAST)
def gather_table(table, ids, out):
    """out[t, g, b] = table[ids[t, b], g]: table (V, G), ids (n, B) int64 -> out (n, G, >= B).

    A blocked transpose: each block of 64 gate rows of out[t] stays in L1 while the batch fills it.
    """
    n, B = ids.shape
    G = table.shape[1]
    for t in prange(n):
        ot = out[t]
        for g0 in range(0, G, 64):
            g1 = min(g0 + 64, G)
            for b in range(B):
                row = table[ids[t, b]]
                for g in range(g0, g1):
                    ot[g, b] = row[g]


@njit(inline="always", **FAST)
def _flat_block(gx, gh, clip, input_forget, c, y, j0, j1):
    """Hidden units j0 .. j1 of lstm_step_flat: each gate's rows j0 .. j1 are one contiguous run."""
    H, B = c.shape
    n = (j1 - j0) * B
    cf, yf = c[j0:j1].reshape(n), y[j0:j1].reshape(n)
    xi, xf = gx[j0:j1].reshape(n), gx[H + j0:H + j1].reshape(n)
    xg, xo = gx[2 * H + j0:2 * H + j1].reshape(n), gx[3 * H + j0:3 * H + j1].reshape(n)
    hi, hf = gh[j0:j1].reshape(n), gh[H + j0:H + j1].reshape(n)
    hg, ho = gh[2 * H + j0:2 * H + j1].reshape(n), gh[3 * H + j0:3 * H + j1].reshape(n)
    for q in range(n):
        i = fsigmoid(_clip(xi[q] + hi[q], clip))
        f = _ONE - i if input_forget else fsigmoid(_clip(xf[q] + hf[q], clip))
        cn = f * cf[q] + i * ftanh(_clip(xg[q] + hg[q], clip))
        cf[q] = cn
        yf[q] = fsigmoid(_clip(xo[q] + ho[q], clip)) * ftanh(cn)


@njit(inline="always", **FAST)
def _rows_block(gx, gh, peep, clip, input_forget, c, y, valid, j0, j1):
    """Hidden units j0 .. j1 of lstm_step_rows, one unit (row) at a time, with peepholes and the mask."""
    H, B = c.shape
    for j in range(j0, j1):
        pi, pf, po = peep[0, j], peep[1, j], peep[2, j]
        xi, xf, xg, xo = gx[j], gx[H + j], gx[2 * H + j], gx[3 * H + j]
        hi, hf, hg, ho = gh[j], gh[H + j], gh[2 * H + j], gh[3 * H + j]
        cj, yj = c[j], y[j]
        for b in range(B):
            cp = cj[b]
            i = fsigmoid(_clip(xi[b] + hi[b] + pi * cp, clip))
            f = _ONE - i if input_forget else fsigmoid(_clip(xf[b] + hf[b] + pf * cp, clip))
            cn = f * cp + i * ftanh(_clip(xg[b] + hg[b], clip))
            cj[b] = cn if valid[b] else cp
            yj[b] = fsigmoid(_clip(xo[b] + ho[b] + po * cn, clip)) * ftanh(cn)


# One LSTM step with sigmoid/tanh/tanh, feature-major: gx (4H, B) this step's input projection with the
# bias already added, gh (4H, B) the recurrent projection, c (H, B) updated in place, y (H, B) receives
# o * tanh(c). Threads split blocks of hidden units. "flat" runs when the step has no peepholes and every
# row is valid: each block is then four contiguous runs and vectorises even at B = 1; "rows" handles
# peepholes and the valid (B,) mask (a row past its length keeps its c).

@njit(parallel=True, **FAST)
def lstm_step_flat(gx, gh, clip, input_forget, c, y):
    H = c.shape[0]
    for k in prange((H + UNIT_BLOCK - 1) // UNIT_BLOCK):
        j0 = k * UNIT_BLOCK
        _flat_block(gx, gh, clip, input_forget, c, y, j0, min(j0 + UNIT_BLOCK, H))


@njit(**FAST)
def lstm_step_flat_serial(gx, gh, clip, input_forget, c, y):
    _flat_block(gx, gh, clip, input_forget, c, y, 0, c.shape[0])


@njit(parallel=True, **FAST)
def lstm_step_rows(gx, gh, peep, clip, input_forget, c, y, valid):
    H = c.shape[0]
    for k in prange((H + UNIT_BLOCK - 1) // UNIT_BLOCK):
        j0 = k * UNIT_BLOCK
        _rows_block(gx, gh, peep, clip, input_forget, c, y, valid, j0, min(j0 + UNIT_BLOCK, H))


@njit(**FAST)
def lstm_step_rows_serial(gx, gh, peep, clip, input_forget, c, y, valid):
    _rows_block(gx, gh, peep, clip, input_forget, c, y, valid, 0, c.shape[0])


@njit(**FAST)
def commit_t(src, h, out, valid):
    """commit for feature-major state: src, h (P, B); out (B, P) row-major as the caller wants it.

    Serial on purpose: it is a copy of P*B floats (threads split over j would share cache lines of out).
    Two passes so that each writes contiguously.
    """
    P, B = h.shape
    for j in range(P):
        for b in range(B):
            h[j, b] = src[j, b] if valid[b] else h[j, b]
    for b in range(B):
        for j in range(P):
            out[b, j] = src[j, b] if valid[b] else _ZERO


@njit(parallel=True, cache=True, error_model="numpy")
def lstm_step_generic(gx, gh, bias, peep, clip, input_forget, c, y, valid, codes, alphas, betas, work):
    """One LSTM step for any ONNX activations f, g, h, batch-major: gx, gh (B, 4H), c, y (B, H);
    codes/alphas/betas (3,); work (B, 4H) scratch."""
    B, H = c.shape
    for b in prange(B):
        if not valid[b]:
            continue
        w = work[b]
        for j in range(4 * H):
            w[j] = gx[b, j] + gh[b, j] + bias[j]
        for j in range(H):
            w[j] = _clip(w[j] + peep[0, j] * c[b, j], clip)
            w[H + j] = _clip(w[H + j] + peep[1, j] * c[b, j], clip)
            w[2 * H + j] = _clip(w[2 * H + j], clip)
        act_inplace(w[:H], codes[0], alphas[0], betas[0])
        if input_forget:
            for j in range(H):
                w[H + j] = _ONE - w[j]
        else:
            act_inplace(w[H:2 * H], codes[0], alphas[0], betas[0])
        act_inplace(w[2 * H:3 * H], codes[1], alphas[1], betas[1])
        for j in range(H):
            c[b, j] = w[H + j] * c[b, j] + w[j] * w[2 * H + j]
            w[3 * H + j] = _clip(w[3 * H + j] + peep[2, j] * c[b, j], clip)
            y[b, j] = c[b, j]
        act_inplace(w[3 * H:], codes[0], alphas[0], betas[0])
        act_inplace(y[b], codes[2], alphas[2], betas[2])
        for j in range(H):
            y[b, j] *= w[3 * H + j]


@njit(parallel=True, cache=True, error_model="numpy")
def gru_gates(gx, gh, bias, clip, h, rz, rh, valid, codes, alphas, betas):
    """GRU phase 1: r and z, and r * h for the linear_before_reset=0 form.

    gx (B, 3H), gh (B, >=2H) recurrent projection of r and z, bias (3H,), h (B, H);
    rz (B, 2H) receives r, z; rh (B, H) receives r * h.
    """
    B, H = h.shape
    for b in prange(B):
        if not valid[b]:
            continue
        for j in range(2 * H):
            rz[b, j] = _clip(gx[b, j] + gh[b, j] + bias[j], clip)
        act_inplace(rz[b], codes[0], alphas[0], betas[0])
        for j in range(H):
            rh[b, j] = rz[b, j] * h[b, j]


@njit(parallel=True, cache=True, error_model="numpy")
def gru_update(gx, ghn, b_hn, bias, clip, lbr, h, rz, y, valid, codes, alphas, betas):
    """GRU phase 2: n and the new hidden state.

    ghn (B, H): W_hn h (lbr=1) or W_hn (r * h) (lbr=0); y (B, H) receives the new h.
    n = g(x_n + r * (ghn + b_hn)) with lbr, else g(x_n + ghn + b_n); h' = (1 - z) n + z h.
    """
    B, H = h.shape
    for b in prange(B):
        if not valid[b]:
            continue
        for j in range(H):
            if lbr:
                y[b, j] = _clip(gx[b, 2 * H + j] + bias[2 * H + j] + rz[b, j] * (ghn[b, j] + b_hn[j]), clip)
            else:
                y[b, j] = _clip(gx[b, 2 * H + j] + bias[2 * H + j] + ghn[b, j], clip)
        act_inplace(y[b], codes[1], alphas[1], betas[1])
        for j in range(H):
            z = rz[b, H + j]
            y[b, j] = (_ONE - z) * y[b, j] + z * h[b, j]


@njit(parallel=True, cache=True, error_model="numpy")
def rnn_step(gx, gh, bias, clip, y, valid, codes, alphas, betas):
    """Elman RNN: y (B, H) = f(gx + gh + bias) for valid rows."""
    B, H = y.shape
    for b in prange(B):
        if not valid[b]:
            continue
        for j in range(H):
            y[b, j] = _clip(gx[b, j] + gh[b, j] + bias[j], clip)
        act_inplace(y[b], codes[0], alphas[0], betas[0])


@njit(inline="always", **FAST)
def _commit_row(src, h, out, valid):
    if valid:
        for j in range(h.shape[0]):
            h[j] = src[j]
            out[j] = src[j]
    else:
        for j in range(h.shape[0]):
            out[j] = _ZERO


@njit(parallel=True, **FAST)
def commit(src, h, out, valid):
    """Valid rows: h[b] = out[b] = src[b]; others keep h and get zeros in out. All (B, P)."""
    for b in prange(h.shape[0]):
        _commit_row(src[b], h[b], out[b], valid[b])


@njit(**FAST)
def commit_serial(src, h, out, valid):
    """commit without a parallel region (small batches)."""
    for b in range(h.shape[0]):
        _commit_row(src[b], h[b], out[b], valid[b])


# Cephes expf: exp(x) = 2^n * e^r with |r| <= ln2/2, r's polynomial to 1 ulp. Kept in two passes (mantissa
# polynomial, then 2^n built from exponent bits) so both loops vectorise; libm exp is a scalar call here.
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_E0, _E1, _E2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_E3, _E4, _E5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_EXP_MIN = np.float32(-87.0)  # exp(-87) is still a normal float; anything lower adds < 1e-37 to a sum >= 1


@njit(inline="always", **FAST)
def exp_split(x):
    """exp(x) for x <= 0 as (mantissa, int32 bits of the float 2^n): the caller multiplies the mantissa by
    the bits viewed as float32, in a second loop."""
    x = max(x, _EXP_MIN)
    n = np.floor(x * _LOG2E + _HALF)
    r = x - n * _LN2_HI - n * _LN2_LO
    return ((((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * r * r + r + _ONE,
            (np.int32(n) + 127) << 23)


@njit(inline="always", **FAST)
def _sum_exp(row, m, mant, bits):
    """sum_k exp(row[k] - m) for row (K,) with max m; mant (K,) float32 and bits (K,) int32 scratch."""
    K = row.shape[0]
    for k in range(K):
        mant[k], bits[k] = exp_split(row[k] - m)
    scale = bits.view(np.float32)
    s = np.float32(0.0)
    for k in range(K):
        s += mant[k] * scale[k]
    return s


@njit(parallel=True, **FAST)
def log_softmax_rows(x):
    """In place: x (N, K) logits -> log-probabilities, row by row."""
    N, K = x.shape
    for n in prange(N):
        m = -BIG
        for k in range(K):
            m = max(m, x[n, k])
        lse = m + np.log(_sum_exp(x[n], m, np.empty(K, np.float32), np.empty(K, np.int32)))
        for k in range(K):
            x[n, k] -= lse


@njit(**FAST)
def gather_log_softmax(x, targets, out):
    """out[n] = log_softmax(x[n])[targets[n]] for x (N, K) logits, targets (N,) int64, out (N,).

    Serial: each worker thread takes its own share of the rows (head.target_log_probs for small heads).
    """
    N, K = x.shape
    mant, bits = np.empty(K, np.float32), np.empty(K, np.int32)
    for n in range(N):
        m = -BIG
        for k in range(K):
            m = max(m, x[n, k])
        out[n] = x[n, targets[n]] - m - np.log(_sum_exp(x[n], m, mant, bits))
