"""Scoring in plain NumPy, for one-shot jobs too short to pay for Numba's start-up.

A fresh process that runs one kernel pays 0.27-0.37 s importing lstm-infer with Numba (most of it Numba) and
~0.2 s for Numba's first cache load
(the typing and lowering registries, under cProfile), whatever the kernel. A warm one-line ``lstm-infer
score`` (128 words) of the benchmark's 1500-unit model took 1.10-1.29 s that way, of which the steps were
0.15-0.19 s; here it takes 0.54-0.76 s, and on the bundled model 0.18-0.25 s against 0.39-0.84 s (runs on one
2-core VM, minutes apart). So the CLI scores small files with these steps (Model(jit=False)) and Numba is
never imported. Everything else, and long inputs, take the kernels.

Standard LSTM stacks only (peepholes, clip, coupled input-forget gate, projection and both directions
included): fits() says whether a stack qualifies. The math is recurrent.py's, written out per step with
NumPy's own exp and tanh rather than the kernels' rational approximations; tests compare both against
PyTorch. Shapes: T steps, B rows, H units, P = proj_size or H, G = 4H.
"""

from __future__ import annotations

import numpy as np

from .layers import BIG, Direction, Layer

F32 = np.float32
TILE_ROWS = 256  # rows of logits alive at once


def fits(layers: list[Layer]) -> bool:
    """Whether every layer is an LSTM with the standard activations."""
    return all(ly.cell == "lstm" and all(dw.standard for dw in ly.dirs) for ly in layers)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: 1 / inf = 0 is right
        return F32(1.0) / (F32(1.0) + np.exp(-x))


def _lstm(ly: Layer, dw: Direction, x: np.ndarray, h: np.ndarray, c: np.ndarray, valid: np.ndarray
          ) -> np.ndarray:
    """One direction: x (T, B, I) -> out (T, B, P); h (B, P), c (B, H) updated in place; valid (T, B)."""
    T, B, _ = x.shape
    H = ly.hidden
    gx = (x.reshape(T * B, x.shape[2]) @ dw.w_ih.T).reshape(T, B, 4 * H)
    gx += dw.bias
    peep = dw.peep if dw.peep.any() else None
    clip = None if ly.clip >= BIG else ly.clip
    out = np.zeros((T, B, ly.out), F32)
    hs, cs = h.copy(), c.copy()

    def pre(v: np.ndarray) -> np.ndarray:
        return v if clip is None else np.clip(v, -clip, clip)

    for t in range(T - 1, -1, -1) if dw.reverse else range(T):
        g = gx[t] + hs @ dw.w_hh.T  # (B, G): gate order i, f, g, o (format.py)
        gi, gf, gg, go = g[:, :H], g[:, H:2 * H], g[:, 2 * H:3 * H], g[:, 3 * H:]
        if peep is not None:  # input and forget gates see c(t-1), the output gate c(t)
            gi, gf = gi + peep[0] * cs, gf + peep[1] * cs
        i = _sigmoid(pre(gi))
        f = F32(1.0) - i if ly.input_forget else _sigmoid(pre(gf))
        cn = f * cs + i * np.tanh(pre(gg))
        if peep is not None:
            go = go + peep[2] * cn
        y = _sigmoid(pre(go)) * np.tanh(cn)
        if dw.w_hr is not None:
            y = y @ dw.w_hr.T
        ok = valid[t][:, None]  # a row past its length keeps its state and emits zeros
        cs = np.where(ok, cn, cs)
        hs = np.where(ok, y, hs)
        out[t] = np.where(ok, y, F32(0.0))
    h[...] = hs
    c[...] = cs
    return out


def run_stack(layers: list[Layer], x: np.ndarray, state: list, valid: np.ndarray) -> np.ndarray:
    """recurrent.run_stack for fits() stacks: x (T, B, I) -> (T, B, D*P); state (layers.zero_state) in place."""
    k = 0
    for ly in layers:
        outs = []
        for dw in ly.dirs:
            h, c = state[k]
            outs.append(_lstm(ly, dw, x, h, c, valid))
            k += 1
        x = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=2)
    return x


def target_log_probs(feats: np.ndarray, w: np.ndarray, b: np.ndarray | None, targets: np.ndarray) -> np.ndarray:
    """log_softmax(feats @ w.T + b)[n, targets[n]] for feats (N, F), targets (N,) -> (N,), float64 sums."""
    n = feats.shape[0]
    out = np.empty(n, F32)
    for s in range(0, n, TILE_ROWS):
        e = min(n, s + TILE_ROWS)
        z = feats[s:e] @ w.T
        if b is not None:
            z += b
        m = z.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1, dtype=np.float64)).astype(F32)
        out[s:e] = z[np.arange(e - s), targets[s:e]] - lse
    return out
