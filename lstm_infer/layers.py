"""A model's layers as the engine holds them: weights in kernel layout (format.py) and per-layer choices.

No Numba here: loading a model and scoring a short text in NumPy (eager.py) must not import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .format import ACTIVATIONS, DEFAULT_ACTIVATIONS, DIRECTIONS

F32 = np.float32
BIG = np.float32(3.0e38)  # stands in for "no clip": the kernels' fastmath assumes no infinities


@dataclass
class Direction:
    """Weights of one direction of one layer, in kernel layout (see format.py)."""

    w_ih: np.ndarray  # (G*H, I)
    w_hh: np.ndarray  # (G*H, P)
    bias: np.ndarray  # (G*H,)
    b_hn: np.ndarray | None  # (H,) gru
    peep: np.ndarray  # (3, H); zeros when the layer has no peepholes
    w_hr: np.ndarray | None  # (P, H) lstm with projection
    codes: np.ndarray  # (n_act,) int64 activation codes
    alphas: np.ndarray  # (n_act,) float32
    betas: np.ndarray  # (n_act,) float32
    standard: bool  # activations are the cell's defaults with default parameters
    reverse: bool
    # Batch-1 copies in other layouts, made once the direction has run recurrent.COPY_AFTER batch-1
    # steps (recurrent._batch1):
    w_ih_t: np.ndarray | None = None  # (I, G*H) W_ih^T for fused.project_rows (_input_projection)
    w_hh_p: np.ndarray | None = None  # (Hp/16, H, 64) W_hh in panels for fused.lstm_steps_row (run_lstm_t)
    batch1_steps: int = 0


@dataclass
class Layer:
    cell: str
    input_size: int
    hidden: int  # H
    out: int  # P = proj_size or H
    clip: np.float32
    input_forget: bool
    lbr: bool
    dirs: list[Direction]

    @property
    def output_size(self) -> int:
        return len(self.dirs) * self.out


def build_layers(config: dict, tensors: dict[str, np.ndarray]) -> list[Layer]:
    layers = []
    for li, lc in enumerate(config["layers"]):
        h = lc["hidden_size"]
        dirs = []
        for d, acts in zip(DIRECTIONS[lc["direction"]], lc["activations"]):
            pre = f"layers.{li}.{d}."
            names = tuple(a["name"] for a in acts)
            standard = names == DEFAULT_ACTIVATIONS[lc["cell"]]
            dirs.append(Direction(
                w_ih=tensors[pre + "w_ih"], w_hh=tensors[pre + "w_hh"], bias=tensors[pre + "bias"],
                b_hn=tensors.get(pre + "b_hn"),
                peep=tensors[pre + "peephole"] if lc["peepholes"] else np.zeros((3, h), F32),
                w_hr=tensors.get(pre + "w_hr"),
                codes=np.array([ACTIVATIONS[n][0] for n in names], np.int64),
                alphas=np.array([a["alpha"] for a in acts], F32),
                betas=np.array([a["beta"] for a in acts], F32),
                standard=standard, reverse=d == "bw"))
        layers.append(Layer(cell=lc["cell"], input_size=lc["input_size"], hidden=h,
                            out=lc["proj_size"] or h,
                            clip=F32(lc["clip"]) if lc["clip"] is not None else BIG,
                            input_forget=lc["input_forget"], lbr=lc["linear_before_reset"], dirs=dirs))
    return layers


def zero_state(layers: list[Layer], batch: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """One (h (B, P), c (B, H) or None) pair per layer and direction, in PyTorch's order."""
    return [(np.zeros((batch, ly.out), F32), np.zeros((batch, ly.hidden), F32) if ly.cell == "lstm" else None)
            for ly in layers for _ in ly.dirs]


def plain_lstm(ly: Layer) -> bool:
    """A layer that run_lstm_t runs as one direction of fused steps without a projection."""
    return ly.cell == "lstm" and len(ly.dirs) == 1 and ly.dirs[0].standard and ly.dirs[0].w_hr is None
