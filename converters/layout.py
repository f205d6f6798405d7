"""Source layouts -> the engine's kernel layout (see lstm_infer/format.py), one direction at a time.

Engine gate order: lstm i, f, g, o; gru r, z, n. PyTorch already uses it; ONNX uses
lstm i, o, f, c (peepholes i, o, f) and gru z, r, h.
"""

from __future__ import annotations

import numpy as np

from lstm_infer.format import CELLS, DIRECTIONS

# Engine block k takes source block ONNX_PERM[cell][k].
ONNX_PERM = {"lstm": (0, 2, 3, 1), "gru": (1, 0, 2), "rnn": (0,)}


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _blocks(a: np.ndarray, perm: tuple[int, ...]) -> np.ndarray:
    """Reorder the gate blocks along axis 0 of a (G*H, ...) array."""
    parts = np.split(np.asarray(a), len(perm), axis=0)
    return np.concatenate([parts[p] for p in perm], axis=0)


def from_torch(cell: str, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None) -> dict[str, np.ndarray]:
    """One direction of torch.nn.LSTM / GRU / RNN (weight_ih_l{k}[_reverse] etc.) -> engine tensors.

    PyTorch's GRU is the linear_before_reset=1 form: b_hn stays apart.
    """
    w_ih, w_hh = _f32(w_ih), _f32(w_hh)
    gh = w_ih.shape[0]
    h = gh // CELLS[cell]
    b_ih = np.zeros(gh, np.float32) if b_ih is None else _f32(b_ih)
    b_hh = np.zeros(gh, np.float32) if b_hh is None else _f32(b_hh)
    out = {"w_ih": w_ih, "w_hh": w_hh}
    if cell == "gru":
        out["bias"] = _f32(np.concatenate([b_ih[: 2 * h] + b_hh[: 2 * h], b_ih[2 * h:]]))
        out["b_hn"] = _f32(b_hh[2 * h:])
    else:
        out["bias"] = _f32(b_ih + b_hh)
    if w_hr is not None:
        out["w_hr"] = _f32(w_hr)
    return out


def from_onnx(cell: str, w, r, b=None, p=None, linear_before_reset: bool = False) -> dict[str, np.ndarray]:
    """One direction of an ONNX LSTM / GRU / RNN: W (G*H, I), R (G*H, H), B (2*G*H,), P (3*H,)."""
    perm = ONNX_PERM[cell]
    w, r = _f32(w), _f32(r)
    gh = w.shape[0]
    h = gh // CELLS[cell]
    b = np.zeros(2 * gh, np.float32) if b is None else _f32(b)
    wb, rb = _blocks(b[:gh], perm), _blocks(b[gh:], perm)
    out = {"w_ih": _f32(_blocks(w, perm)), "w_hh": _f32(_blocks(r, perm))}
    if cell == "gru":
        if linear_before_reset:
            out["bias"] = _f32(np.concatenate([wb[: 2 * h] + rb[: 2 * h], wb[2 * h:]]))
            out["b_hn"] = _f32(rb[2 * h:])
        else:
            out["bias"] = _f32(wb + rb)
            out["b_hn"] = np.zeros(h, np.float32)
    else:
        out["bias"] = _f32(wb + rb)
    if p is not None:
        p = np.asarray(p, np.float32).reshape(3, h)
        out["peephole"] = _f32(p[[0, 2, 1]])  # ONNX i, o, f -> engine i, f, o
    return out


def layer_tensors(index: int, direction: str, tensors: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Name one layer's per-direction tensors as the model directory does (fw, then bw)."""
    names = DIRECTIONS[direction]
    if len(names) != len(tensors):
        raise ValueError(f"direction {direction!r} needs {len(names)} set(s) of tensors, got {len(tensors)}")
    return {f"layers.{index}.{d}.{k}": v for d, per_dir in zip(names, tensors) for k, v in per_dir.items()}
