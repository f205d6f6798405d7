"""Do denormal numbers slow the fused LSTM steps down on this CPU?

    python benchmarks/denormals.py

Runs 512 steps of a 512-unit LSTM twice with the same weights: once with the cell state at 1e-3, once at
1e-39 (a float32 denormal) held there by a forget gate of 1 and an input gate of 0, so every h fed into
W_hh @ h is denormal. Prints microseconds per step for a batch of 1 (dot layout) and 32 (panel layout).
lstm-infer does not set flush-to-zero: PyTorch does not by default either, and FTZ/DAZ would change the
numbers the tests compare. Measured on a Zen 5 core: no difference beyond drift (see benchmarks/README.md).
"""

from __future__ import annotations

import time

import numpy as np

from lstm_infer import fused, gang, kernels

F32 = np.float32


def per_step(B: int, H: int, c0: float, n: int = 512, runs: int = 5) -> tuple[float, float]:
    """(median us per step, share of the final h that is denormal) for a batch of B rows."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4 * H, H)) * 0.05).astype(F32)
    panel, N = fused.layout(B, H)
    gx = np.zeros((n, 4 * H, N), F32)
    gx[:, :H] = -30.0  # input gate ~0
    gx[:, H:2 * H] = 30.0  # forget gate ~1: c stays where it starts
    steps = fused.lstm_steps_panel if panel else fused.lstm_steps_dot
    times = []
    for _ in range(runs):
        hbuf = np.zeros((2, H, N) if panel else (2, B, H), F32)
        c, out, acc = np.full((H, N), c0, F32), np.empty((n, B, H), F32), np.zeros((4, H, N), F32)
        t0 = time.perf_counter()
        steps(gx, w, np.empty((4 * H, 0), F32), np.empty((1, 0, N), F32), np.zeros((3, H), F32), False,
              kernels.BIG, False, np.ones((n, B), bool), False, hbuf, c, out, False, acc, np.empty((0, 0), F32),
              False, np.empty((0, 0), np.int64), fused.unit_block(N, H),
              gang.new_counters(n, 1), 0, 1)
        times.append(time.perf_counter() - t0)
    h = np.abs(out[-1])
    return float(np.median(times)) / n * 1e6, float(((h > 0) & (h < np.finfo(F32).tiny)).mean())


def main(rounds: int = 3) -> None:
    """The two states alternate, ``rounds`` times, and each prints its median: in one order only, the
    second state ran 5% slower at B=32 (345 vs 328 us), which alternating showed to be drift."""
    for B in (1, 32):
        times: dict[str, list[float]] = {"normal": [], "denormal": []}
        shares = {}
        for _ in range(rounds):
            for label, c0 in (("normal", 1e-3), ("denormal", 1e-39)):
                us, shares[label] = per_step(B, 512, c0)
                times[label].append(us)
        for label, ts in times.items():
            print(f"B={B:<3} {label:9} {np.median(ts):7.1f} us/step  (denormal share of h: {shares[label]:.0%})")


if __name__ == "__main__":
    main()
