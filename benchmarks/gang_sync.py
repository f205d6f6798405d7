"""What a gang (lstm_infer/gang.py) costs per step when the blocks hold no work.

    python benchmarks/gang_sync.py

Two members take, finish and wait for every block of 100,000 empty steps: the time per step is the
synchronisation a fused LSTM step pays on top of its arithmetic, for 4 blocks (a batch-1 step of 512
units) and 32 (a B=32 step of 512 units).
"""

from __future__ import annotations

import time

from numba import njit

from lstm_infer import gang
from lstm_infer.workers import Workers


@njit(nogil=True, cache=True)
def _empty_steps(counters, me, members, blocks):
    for s in range(counters.shape[0]):
        k = gang.take(counters, s, me, members, blocks)
        while k >= 0:
            gang.finish(counters, s, members)
            k = gang.take(counters, s, me, members, blocks)
        gang.wait_all(counters, s, members, blocks)


def per_step(blocks: int, members: int = 2, steps: int = 100_000, runs: int = 3) -> float:
    """Best microseconds per empty step over ``runs`` gangs."""
    wk, best = Workers(members), float("inf")
    for _ in range(runs):
        counters = gang.new_counters(steps, members)
        t0 = time.perf_counter()
        wk.gang(lambda me, m, c=counters: _empty_steps(c, me, m, blocks), members)
        best = min(best, (time.perf_counter() - t0) / steps * 1e6)
    return best


if __name__ == "__main__":
    for blocks in (4, 32):
        print(f"{blocks:3} blocks: {per_step(blocks):.2f} us per step")
