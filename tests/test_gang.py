"""Block sharing among a gang of threads (lstm_infer/gang.py), as the fused LSTM steps use it, and how
workers.py starts a gang."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from numba import njit

from lstm_infer import gang, workers
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


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or workers._GETCPU is None, reason="Linux only")
def test_worker_moves_off_the_callers_cpu_and_keeps_its_affinity():
    """_off_cpu runs fn(*args) on another CPU than ``caller`` (given as the CPU it is on) and leaves the
    thread's allowed CPUs as they were."""
    seen = {}

    def probe(a: int, b: int) -> None:
        seen["args"], seen["cpu"], seen["allowed"] = (a, b), workers._current_cpu(), os.sched_getaffinity(0)

    def run() -> None:
        before = os.sched_getaffinity(0)
        here = min(before)
        os.sched_setaffinity(0, {here})  # now on CPU ``here``; widening again does not move the thread
        os.sched_setaffinity(0, before)
        workers._off_cpu(here, probe, 3, 4)
        seen["before"], seen["here"] = before, here

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["args"] == (3, 4) and seen["allowed"] == seen["before"]
    if len(seen["before"]) > 1:
        assert seen["cpu"] != seen["here"]


def _split_sum(wk: Workers) -> int:
    out = np.zeros(8, np.int64)

    def part(s: int, e: int) -> None:
        out[s:e] = np.arange(s, e)

    wk.split(part, 8)
    wk.gang(lambda me, n: None, 2)
    return int(out.sum())


_FORKED = Workers(2)


def _in_child(_: int) -> int:
    return _split_sum(_FORKED)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_works_in_a_forked_child():
    """A pool started before a fork has no threads in the child: without a fresh pool, the child's first
    split or gang waited forever."""
    import multiprocessing

    assert _split_sum(_FORKED) == 28  # the pool's threads exist in this process now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map_async(_in_child, [0]).get(timeout=30) == [28]
