"""Python worker threads: single-threaded BLAS on shares of a GEMM (split), and gangs of threads that run
a chunk of fused LSTM steps together (gang, see gang.py).

OpenBLAS's own threads spin-wait after every multithreaded call (for up to 2**28 cycles by default), and
Numba's parallel regions that follow find a core taken: fused LSTM steps right after a 2-thread input
projection ran 2.3x slower than after a 1-thread one. So BLAS stays at one thread inside model calls
(Model._threads) and work splits here instead, across threads that sleep on a queue when idle. NumPy's
matmul and our @njit(nogil=True) kernels release the GIL, so the shares run side by side.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MIN_FLOPS = 4e6  # below this a product runs on the calling thread: a hand-off costs ~20-50 us
SCRATCH_BYTES = 64 << 20  # Workers.scratch: the most one name keeps per thread


def _libc_getcpu() -> Callable[[], int] | None:
    try:
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError, TypeError):  # not glibc / Linux
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn


_GETCPU = _libc_getcpu()


def _current_cpu() -> int:
    return _GETCPU() if _GETCPU is not None else -1


def _off_cpu(caller: int, fn: Callable[..., None], *args: int) -> None:
    """fn(*args) on a worker, first moved off the caller's CPU when it woke up there.

    Linux often wakes a sleeping worker on the CPU of the thread that woke it, and spreads the two only
    milliseconds later; a gang then runs at one core's speed (a bundled-model batch after 0.3 s idle: 47
    instead of 28 ms; 33 ms with this move). Setting the affinity to the other CPUs migrates the thread at
    once; restoring it right after leaves the thread where it is, free to move again.
    """
    if caller >= 0 and _current_cpu() == caller and hasattr(os, "sched_setaffinity"):
        allowed = os.sched_getaffinity(0)  # 0: this thread
        others = allowed - {caller}
        if others:
            try:
                os.sched_setaffinity(0, others)
                os.sched_setaffinity(0, allowed)
            except OSError:
                pass
    fn(*args)


_LIVE: weakref.WeakSet = weakref.WeakSet()  # every Workers, for _after_fork


def _after_fork() -> None:
    """In a forked child the pool's threads do not exist: a task sent to them would wait forever (a model
    used before multiprocessing's fork hung in the child). Each Workers starts a fresh pool on next use."""
    for w in list(_LIVE):
        w._pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class Workers:
    """``threads`` worker threads, started on first use; ``threads=1`` runs everything inline."""

    def __init__(self, threads: int):
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # per calling thread: scratch buffers (buffer())
        _LIVE.add(self)

    def buffer(self, name: str, rows: int, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 scratch array (rows, *shape) over storage kept per calling thread under ``name``, grown when a
        call needs more and never shrunk, whatever the shape asked for.

        A fresh 8 MB array costs ~2,000 page faults on first touch, 2-10 ms per scored batch here. Contents:
        zeros or whatever an earlier call wrote, so callers write what they read before reading it, except
        padding columns, which only ever hold finite values that never mix with real ones.
        """
        n = rows * int(np.prod(shape))
        bufs = self._local.__dict__.setdefault("bufs", {})
        buf = bufs.get(name)
        if buf is None or buf.size < n:
            buf = bufs[name] = np.zeros(n, np.float32)
        return buf[:n].reshape(rows, *shape)

    def scratch(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """buffer() for an output its caller consumes before the next call, or None when it would pass
        SCRATCH_BYTES, so that one huge call does not leave its size held."""
        if 4 * int(np.prod(shape)) > SCRATCH_BYTES:
            return None
        return self.buffer(name, shape[0], shape[1:])

    def split(self, fn: Callable[[int, int], None], n: int, min_rows: int = 1) -> None:
        """fn(s, e) over contiguous parts of range(n), at most one per thread and each >= min_rows long."""
        parts = max(1, min(self.threads, n // max(min_rows, 1)))
        if parts == 1:
            if n:
                fn(0, n)
            return
        bounds = [n * k // parts for k in range(parts + 1)]
        self._fan_out(fn, list(zip(bounds[:-1], bounds[1:])))

    def gang(self, fn: Callable[[int, int], None], members: int) -> None:
        """fn(me, members) for me = 0 .. members - 1 (at most ``threads``), the caller being member 0: the
        members of a gang (gang.py) share a chunk's steps block by block, and a member that starts late or
        not at all only leaves more blocks to the others, so gangs need no lock against each other."""
        if members > self.threads:
            raise ValueError(f"a gang of {members} needs as many threads, not {self.threads}")
        self._fan_out(fn, [(k, members) for k in range(members)])

    def _fan_out(self, fn: Callable[..., None], calls: list[tuple[int, ...]]) -> None:
        """fn(*calls[0]) on the calling thread, the other calls on the pool; returns when all are done."""
        if len(calls) == 1:
            fn(*calls[0])
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="lstm-infer")
        caller = _current_cpu()
        futures = [self._pool.submit(_off_cpu, caller, fn, *a) for a in calls[1:]]
        fn(*calls[0])
        for f in futures:
            f.result()

    def matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """a (M, K) @ b (K, N), split over the rows of the output (or its columns when M is small)."""
        M, K = a.shape
        N = b.shape[1]
        if out is None:
            out = np.empty((M, N), np.result_type(a, b))
        if self.threads == 1 or 2.0 * M * N * K < MIN_FLOPS:
            np.matmul(a, b, out=out)
        elif M >= 8 * self.threads:
            self.split(lambda s, e: np.matmul(a[s:e], b, out=out[s:e]), M)
        else:
            self.split(lambda s, e: np.matmul(a, b[:, s:e], out=out[:, s:e]), N, 16)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
