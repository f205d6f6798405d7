"""The output head: logits, log-probabilities, and target log-probs fused over cache-sized tiles."""

from __future__ import annotations

import numpy as np

from . import kernels
from .workers import Workers

TILE_ROWS = 256  # rows of logits alive at once: 256 x 10k floats = 10 MB, sized to stay near L2/L3


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

    Each worker takes a share of the rows and never holds more than ``tile`` rows of logits.
    """
    n = feats.shape[0]
    out = np.empty(n, np.float32)

    def part(s0: int, e0: int) -> None:
        buf = np.empty((min(tile, e0 - s0), w.shape[0]), np.float32)
        for s in range(s0, e0, tile):
            e = min(s + tile, e0)
            logit = buf[: e - s]
            np.matmul(feats[s:e], w.T, out=logit)
            if b is not None:
                logit += b
            kernels.gather_log_softmax_serial(logit, targets[s:e], out[s:e])

    wk.split(part, n, min_rows=32)
    return out
