"""Block sharing among a gang of threads (lstm_infer/gang.py), as the fused LSTM steps use it."""

from __future__ import annotations

import time

import numpy as np
import pytest
from numba import njit

from lstm_infer import gang
from lstm_infer.workers import Workers


@njit(nogil=True, cache=True)
def _steps(counters, me, members, blocks, hits, early, sink):
    """Each step: take blocks until none is left, work a little, mark each, then wait for the step. A block
    of the step found unmarked after wait_all means the wait let a member through early."""
    for s in range(hits.shape[0]):
        k = gang.take(counters, s, me, members, blocks)
        while k >= 0:
            x = np.float64(k)
            for _ in range(300):  # ~0.3 us of dependent work: a window for the others to leave early in
                x = x * 0.999 + 1.0
            sink[me] += x
            hits[s, k] += 1
            gang.finish(counters, s, members)
            k = gang.take(counters, s, me, members, blocks)
        gang.wait_all(counters, s, members, blocks)
        for j in range(blocks):
            if hits[s, j] == 0:
                early[me] += 1


@pytest.mark.parametrize("members,blocks,late", [(1, 5, 0.0), (2, 8, 0.0), (3, 7, 0.0), (2, 8, 0.02)])
def test_every_block_once_and_no_step_left_early(members, blocks, late):
    """3 members on a 2-core machine exercise the yielding wait; ``late``: member 1 starts 20 ms after the
    others, who must take its blocks meanwhile (nothing waits for it)."""
    steps = 3000
    hits, early, sink = np.zeros((steps, blocks), np.int64), np.zeros(members, np.int64), np.zeros(members)
    counters = gang.new_counters(steps, members)

    def member(me: int, n: int) -> None:
        if me == 1 and late:
            time.sleep(late)
        _steps(counters, me, n, blocks, hits, early, sink)

    Workers(members).gang(member, members)
    assert (hits == 1).all()
    assert early.tolist() == [0] * members


def test_gang_needs_enough_threads():
    with pytest.raises(ValueError, match="needs as many threads"):
        Workers(2).gang(lambda me, n: None, 3)
