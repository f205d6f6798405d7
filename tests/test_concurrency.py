"""One loaded Model used from several Python threads at once gives the serial results.

Model sets Numba's thread count (thread-local in Numba) and limits BLAS threads (process-wide, through
threadpoolctl) around every call; both must leave results, and the process's settings, as they were.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from lstm_infer import load
from tests.test_hostile import tiny_model
from tests.util import assert_close

ROUNDS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("conc") / "m", E=6, H=24, seed=5)


def jobs(seed: int):
    """A few calls of every kind, with inputs that differ per seed; returns a function computing all of them."""
    rng = np.random.default_rng(seed)
    T, B = int(rng.integers(5, 30)), int(rng.integers(1, 9))
    ids = rng.integers(0, 256, (T, B))
    targets = rng.integers(0, 256, (T, B))
    lengths = rng.integers(0, T + 1, B)
    lines = ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(0, 60)))
             for _ in range(int(rng.integers(3, 20)))]
    steps = rng.integers(0, 256, (12, 3))

    def run(model) -> list[np.ndarray]:
        out = [model.target_log_probs(ids, targets, lengths=lengths)[0], model.logits(ids)[0]]
        r = model.score(lines, batch_size=4, per_token=True)
        out.append(np.array([lp for ls in r.lines for lp in ls.token_log_probs] + [r.log_prob]))
        out.append(np.array([ls.log_prob for ls in model.score(lines, mode="stream").lines]))
        state = None
        for row in steps:  # token by token, the state carried
            lp, state = model.step(row, state)
            out.append(lp)
        return out
    return run


def blas_threads() -> list[int]:
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_share_one_model(model_dir, threads):
    model = load(model_dir, threads=threads)
    runs = [jobs(s) for s in range(8)]
    serial = [run(model) for run in runs]
    before = (numba.get_num_threads(), blas_threads())
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(ROUNDS):
            got = list(pool.map(lambda run: run(model), runs))
            for g, s in zip(got, serial):
                for a, b in zip(g, s):
                    assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (numba.get_num_threads(), blas_threads()) == before


def test_models_with_different_thread_counts_at_once(model_dir):
    """Two Models over the same files, one with 1 thread and one with all: per-thread settings do not leak."""
    one, many = load(model_dir, threads=1), load(model_dir)
    runs = [jobs(100 + s) for s in range(6)]
    serial = [run(one) for run in runs]
    before = (numba.get_num_threads(), blas_threads())
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda k: runs[k](one if k % 2 else many), range(len(runs))))
    for g, s in zip(got, serial):
        for a, b in zip(g, s):
            assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (numba.get_num_threads(), blas_threads()) == before


def test_workqueue_layer_is_serialised(model_dir):
    """Numba's fallback layer (no TBB, no OpenMP) aborts the process on concurrent launches: Model must queue them."""
    code = f"""
from concurrent.futures import ThreadPoolExecutor
import numba
from lstm_infer import load
from tests.test_concurrency import jobs
model = load({str(model_dir)!r}, threads=2)
runs = [jobs(s) for s in range(4)]
with ThreadPoolExecutor(max_workers=4) as pool:
    list(pool.map(lambda run: run(model), runs * 2))
print(numba.threading_layer())
"""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["workqueue"], res.stderr[-2000:]
