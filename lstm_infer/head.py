"""The output head: logits, log-probabilities, and target log-probs fused over cache-sized tiles."""

from __future__ import annotations

import numpy as np

from . import kernels

TILE_ROWS = 256  # rows of logits alive at once: 256 x 10k floats = 10 MB, sized to stay near L2/L3


def logits(feats: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """feats (N, F) @ w (K, F).T + b (K,) -> (N, K)."""
    out = np.matmul(feats, w.T)
    if b is not None:
        out += b
    return out


def log_probs(feats: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    out = logits(feats, w, b)
    kernels.log_softmax_rows(out)
    return out


def target_log_probs(feats: np.ndarray, w: np.ndarray, b: np.ndarray | None,
                     targets: np.ndarray, tile: int = TILE_ROWS) -> np.ndarray:
    """log_softmax(feats @ w.T + b)[n, targets[n]] for feats (N, F), targets (N,) -> (N,).

    Never holds more than ``tile`` rows of logits.
    """
    n = feats.shape[0]
    out = np.empty(n, np.float32)
    buf = np.empty((min(tile, n), w.shape[0]), np.float32)
    for s in range(0, n, tile):
        e = min(s + tile, n)
        part = buf[: e - s]
        np.matmul(feats[s:e], w.T, out=part)
        if b is not None:
            part += b
        kernels.gather_log_softmax(part, targets[s:e], out[s:e])
    return out
