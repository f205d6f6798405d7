"""The machine: what it is (CPU, cores, library versions) and what it can do (sgemm peak, copy and read bandwidth)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import threading
import time
from importlib import metadata

import numpy as np

PACKAGES = ("lstm-infer", "numba", "numpy", "torch", "onnxruntime", "openvino", "onnx")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def describe() -> dict:
    """CPU model, core count, caches, SIMD features and package versions."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    if os.path.isdir(base):
        for idx in sorted(os.listdir(base)):
            try:
                with open(f"{base}/{idx}/level") as f:
                    level = f.read().strip()
                with open(f"{base}/{idx}/type") as f:
                    kind = f.read().strip()
                with open(f"{base}/{idx}/size") as f:
                    size = f.read().strip()
            except OSError:
                continue
            caches[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = size
    flags = cpu_flags()
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    blas = []
    try:
        from threadpoolctl import threadpool_info

        blas = sorted({f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')} kernels)"
                       for p in threadpool_info()
                       if p.get("user_api") == "blas"})
    except ImportError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "caches_per_core": caches,
            "simd": sorted(f for f in flags if f.startswith(("avx512f", "avx2", "amx", "avx512_bf16"))),
            "amx": "amx_bf16" in flags, "python": platform.python_version(), "kernel": platform.release(),
            "versions": versions, "numpy_blas": blas, "engine_source": engine_source()}


def engine_source() -> dict:
    """Where lstm_infer is imported from, its git commit and whether the engine's files differ from it."""
    try:
        import lstm_infer
    except ImportError:
        return {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(lstm_infer.__file__)))

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    dirty = git("status", "--porcelain", "--", "lstm_infer", "converters").splitlines()
    return {"path": root, "commit": git("rev-parse", "--short", "HEAD") or None,
            "uncommitted": [line[3:] for line in dirty]}


def sgemm_peak(threads: int, n: int = 4096, repeats: int = 5) -> dict:
    """float32 (n, n) @ (n, n) with NumPy's BLAS limited to ``threads``: GFLOP/s best and median of ``repeats``."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    c = np.empty((n, n), np.float32)
    rates = []
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=c)  # warm-up: thread pool, page faults
        for _ in range(repeats):
            t = time.perf_counter()
            np.matmul(a, b, out=c)
            rates.append(2.0 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return {"threads": threads, "n": n, "gflops_best": max(rates), "gflops_median": float(np.median(rates))}


def copy_bandwidth(mbytes: int = 512, repeats: int = 5) -> dict:
    """np.copyto of a ``mbytes`` MB float32 array, single thread: GB/s counting bytes read + bytes written."""
    n = mbytes * (1 << 20) // 4
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)
    np.copyto(dst, src)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        rates.append(2.0 * src.nbytes / (time.perf_counter() - t) / 1e9)
    return {"mbytes": mbytes, "gbs_best": max(rates), "gbs_median": float(np.median(rates)),
            "counts": "bytes read + bytes written"}


@functools.cache
def _read_kernel():
    """A Numba loop that sums a float32 array ``reps`` times: LLVM vectorises it, so one core reads at the speed
    its caches or memory deliver: 81-102 GB/s up to 8 MB on one Zen 4 core, where summing into a 16-float array
    read 11-15 GB/s (LLVM left the array in memory). Made on first use: the driver imports Numba only to measure."""
    from numba import njit

    @njit(fastmath=True, nogil=True)
    def read(a, reps):
        s = np.float32(0.0)
        for _ in range(reps):
            for i in range(a.shape[0]):
                s += a[i]
        return s

    return read


def read_bandwidth(mbytes: float, threads: int, seconds: float = 0.3, repeats: int = 3) -> dict:
    """GB/s at which ``threads`` threads read a float32 buffer of ``mbytes`` MB, each its own contiguous part
    over and over: what batch-1 decoding does with a model's weights every step. So the figure is the
    cache's speed where the buffer fits in the caches (per core, or the shared L3) and memory's where it
    does not; the best of ``repeats`` timed runs of about ``seconds`` each."""
    read = _read_kernel()
    buf = np.ones(max(threads * 16, int(mbytes * 1e6) // 4), np.float32)
    parts = np.array_split(buf, threads)
    read(parts[0], 1)  # compile, and fault the pages in
    t = time.perf_counter()
    for p in parts:
        read(p, 1)
    one_pass = max(time.perf_counter() - t, 1e-6)  # every part once, one after the other
    reps = max(1, int(seconds * threads / one_pass))

    def run(start: threading.Barrier, part: np.ndarray) -> None:
        start.wait()
        read(part, reps)

    rates = []
    for _ in range(repeats):
        start = threading.Barrier(threads + 1)
        workers = [threading.Thread(target=run, args=(start, p)) for p in parts]
        for w in workers:
            w.start()
        start.wait()
        t = time.perf_counter()
        for w in workers:
            w.join()
        rates.append(buf.nbytes * reps / (time.perf_counter() - t) / 1e9)
    return {"mbytes": buf.nbytes / 1e6, "threads": threads, "reps": reps, "gbs_best": max(rates),
            "gbs_median": float(np.median(rates)), "counts": "bytes read"}
