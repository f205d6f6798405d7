"""The output head: logits, log-probabilities, and target log-probs fused over cache-sized tiles."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import kernels
from .kernels import BIG, FAST, exp_split
from .simd import LANES, rows_gemm
from .workers import Workers

FM_HEAD_BYTES = 4 << 20  # heads up to this size read the features feature-major, a time step per task
FM_MIN_STEPS = 8  # ... given at least this many time steps to share among the threads
TILE_ROWS = 256  # rows of logits alive at once: 256 x 10k floats = 10 MB, sized to stay near L2/L3
COLS = 64  # tokens per task of the panel head: four vectors, the widest tile of simd.rows_gemm


def logits(feats: np.ndarray, w: np.ndarray, b: np.ndarray | None, wk: Workers) -> np.ndarray:
    """feats (N, F) @ w (K, F).T + b (K,) -> (N, K)."""
    out = wk.matmul(feats, w.T)
    if b is not None:
        out += b
    return out


def log_probs(feats: np.ndarray, w: np.ndarray, b: np.ndarray | None, wk: Workers) -> np.ndarray:
    out = logits(feats, w, b, wk)
    kernels.log_softmax_rows(out)
    return out


def target_log_probs(feats: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                     targets: np.ndarray, wk: Workers, tile: int = TILE_ROWS) -> np.ndarray:
    """log_softmax(feats @ w.T + b)[n, targets[n]] for feats (N, F), targets (N,) -> (N,).

    Heads of 8 outputs or more run target_log_probs_panel (each task holds K x 64 logits). Smaller ones
    split rows over the workers, each holding at most ``tile`` rows of logits.
    """
    n = feats.shape[0]
    out = np.empty(n, np.float32)
    if w.shape[0] >= 8 and n:
        bias = np.zeros(w.shape[0], np.float32) if b is None else b
        target_log_probs_panel(np.ascontiguousarray(feats), w, bias, targets, out)
        return out

    def part(s0: int, e0: int) -> None:
        buf = np.empty((min(tile, e0 - s0), w.shape[0]), np.float32)
        for s in range(s0, e0, tile):
            e = min(s + tile, e0)
            logit = buf[: e - s]
            np.matmul(feats[s:e], w.T, out=logit)
            if b is not None:
                logit += b
            kernels.gather_log_softmax(logit, targets[s:e], out[s:e])

    wk.split(part, n, min_rows=32)
    return out


@njit(parallel=True, **FAST)
def target_log_probs_panel(feats, w, b, targets, out):
    """out[n] = log_softmax(w @ feats[n] + b)[targets[n]]: feats (N, F), w (K, F) C-contiguous, K >= 8,
    b (K,), targets (N,) int64, out (N,).

    A task takes 64 tokens: their logits come out transposed, (K, 64), from simd.rows_gemm with every
    head weight read once per task, and the log-softmax then runs down the columns, vectorised across
    the 64 tokens. All in one parallel region: no BLAS, so no BLAS threads to hand the cores back and forth.
    """
    N, F = feats.shape
    K = w.shape[0]
    for task in prange(-(-N // COLS)):
        n0 = task * COLS
        nc = min(COLS, N - n0)
        cols = -(-nc // LANES) * LANES
        ft = np.zeros((F, cols), np.float32)
        for c in range(nc):
            fr = feats[n0 + c]
            for k in range(F):
                ft[k, c] = fr[k]
        logit = np.empty((K, cols), np.float32)
        rows_gemm(w, 0, K, ft, logit, 0, True)
        _column_log_softmax(logit, b, targets[n0:n0 + nc], nc, out[n0:n0 + nc])


def fm_fits(w: np.ndarray, T: int) -> bool:
    """Whether target_log_probs_fm takes a head w (K, F) for T time steps: a task per step re-reads w, so
    the head must be small (the char and bundled models' 0.5 MB), and there must be steps to share."""
    return w.shape[0] >= 8 and w.nbytes <= FM_HEAD_BYTES and T >= FM_MIN_STEPS


def target_log_probs_fm(feats: np.ndarray, B: int, w: np.ndarray, b: np.ndarray | None,
                        targets: np.ndarray) -> np.ndarray:
    """target_log_probs for features (T, F, N) feature-major (recurrent.run_stack's fm_last), N >= B: the
    layout the head's GEMM reads, so the last layer writes no transposed output and the head transposes no
    tiles (2 threads, random weights: a B=32, H=512 layer step 354 -> 344 us; a 128 x 32-token head of the
    bundled model's size, 256 x 512, 6.1 -> 5.4 ms; the bundled model's batch 55.9 -> 53.3 ms).
    targets (T, B) -> (T, B)."""
    out = np.empty(targets.shape, np.float32)
    bias = np.zeros(w.shape[0], np.float32) if b is None else b
    _target_log_probs_fm(feats, w, bias, targets, out)
    return out


@njit(parallel=True, **FAST)
def _target_log_probs_fm(feats, w, b, targets, out):
    """out[t, c] = log_softmax(w @ feats[t, :, c] + b)[targets[t, c]] for c < B = targets.shape[1]: feats
    (T, F, N) with N a multiple of LANES, w (K, F), K >= 8. A task per time step, its logits (K, N) from
    simd.rows_gemm and the log-softmax down the columns (as target_log_probs_panel)."""
    T, F, N = feats.shape
    B = targets.shape[1]
    K = w.shape[0]
    for t in prange(T):
        logit = np.empty((K, N), np.float32)
        rows_gemm(w, 0, K, feats[t], logit, 0, True)
        _column_log_softmax(logit, b, targets[t], B, out[t])


@njit(inline="always", **FAST)
def _column_log_softmax(logit, b, targets, n, out):
    """out[c] = log_softmax(logit[:, c] + b)[targets[c]] for c < n: logit (K, cols) gets b added in place."""
    K, cols = logit.shape
    m = np.full(cols, -BIG, np.float32)
    for v in range(K):
        lv, bv = logit[v], b[v]
        for c in range(cols):
            x = lv[c] + bv
            lv[c] = x
            m[c] = max(m[c], x)
    s = np.zeros(cols, np.float32)
    mant, bits = np.empty(cols, np.float32), np.empty(cols, np.int32)
    scale = bits.view(np.float32)
    for v in range(K):
        lv = logit[v]
        for c in range(cols):
            mant[c], bits[c] = exp_split(lv[c] - m[c])
        for c in range(cols):
            s[c] += mant[c] * scale[c]
    for c in range(n):
        out[c] = logit[targets[c], c] - m[c] - np.log(s[c])
