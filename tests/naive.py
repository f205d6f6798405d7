"""Slow, obvious NumPy (float64) twins of the kernels in lstm_infer/kernels.py."""

from __future__ import annotations

import numpy as np


def act(x, name, alpha=0.0, beta=0.0):
    x = np.asarray(x, np.float64)
    return {
        "sigmoid": lambda: 1 / (1 + np.exp(-x)),
        "tanh": lambda: np.tanh(x),
        "relu": lambda: np.maximum(x, 0),
        "hardsigmoid": lambda: np.clip(alpha * x + beta, 0, 1),
        "leakyrelu": lambda: np.where(x >= 0, x, alpha * x),
        "thresholdedrelu": lambda: np.where(x > alpha, x, 0.0),
        "scaledtanh": lambda: alpha * np.tanh(beta * x),
        "affine": lambda: alpha * x + beta,
        "elu": lambda: np.where(x >= 0, x, alpha * (np.exp(x) - 1)),
        "softsign": lambda: x / (1 + np.abs(x)),
        "softplus": lambda: np.log1p(np.exp(x)),
    }[name]()


def lstm_step(gx, gh, bias, peep, clip, input_forget, c, acts=(("sigmoid", 0, 0), ("tanh", 0, 0), ("tanh", 0, 0))):
    """Returns (c_new, y) for gates in engine order i, f, g, o; acts = f, g, h as (name, alpha, beta)."""
    f_, g_, h_ = acts
    pre = np.asarray(gx, np.float64) + gh + bias
    i, f, g, o = np.split(pre, 4, axis=-1)
    cl = (lambda v: np.clip(v, -clip, clip)) if clip else (lambda v: v)
    i = act(cl(i + peep[0] * c), *f_)
    f = 1 - i if input_forget else act(cl(f + peep[1] * c), *f_)
    g = act(cl(g), *g_)
    cn = f * c + i * g
    o = act(cl(o + peep[2] * cn), *f_)
    return cn, o * act(cn, *h_)


def gru_step(gx, h, w_hh, bias, b_hn, lbr, clip=None, acts=(("sigmoid", 0, 0), ("tanh", 0, 0))):
    """New h for gates in engine order r, z, n; w_hh (3H, H)."""
    f_, g_ = acts
    H = h.shape[-1]
    cl = (lambda v: np.clip(v, -clip, clip)) if clip else (lambda v: v)
    gx = np.asarray(gx, np.float64) + bias
    gh = h @ w_hh[: 2 * H].T
    r = act(cl(gx[:, :H] + gh[:, :H]), *f_)
    z = act(cl(gx[:, H:2 * H] + gh[:, H:]), *f_)
    if lbr:
        n = act(cl(gx[:, 2 * H:] + r * (h @ w_hh[2 * H:].T + b_hn)), *g_)
    else:
        n = act(cl(gx[:, 2 * H:] + (r * h) @ w_hh[2 * H:].T + b_hn), *g_)
    return (1 - z) * n + z * h


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
