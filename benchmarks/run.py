"""Benchmark lstm-infer against PyTorch, ONNX Runtime and OpenVINO on CPU (see benchmarks/README.md).

    python benchmarks/run.py            # full run (~20 min on 2 cores), results in benchmarks/results/
    python benchmarks/run.py --quick    # fewer runs and shorter decodes, max thread count only (~5-6 min)

Each (model, thread count) starts one worker process per engine; engines are then timed round by round
on the same inputs, so slow drifts of the machine hit every engine alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Some machines pin OpenBLAS to an older core type (OPENBLAS_CORETYPE=Haswell: AVX2 kernels on AVX-512
# CPUs) as a guard for old OpenBLAS builds; that halves NumPy's sgemm, and with it lstm-infer's GEMMs and the
# measured peak, while the peers bring their own BLAS. The run drops both variables before NumPy loads, in
# this process and so in every worker, and the report records the kernel OpenBLAS then chose
# (--keep-openblas-env keeps them).
OPENBLAS_PINS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if "--keep-openblas-env" not in sys.argv:
    DROPPED_PINS = {k: os.environ.pop(k) for k in OPENBLAS_PINS if k in os.environ}
else:
    DROPPED_PINS = {}

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engines  # noqa: E402
import machine  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402

WORKER = HERE / "worker.py"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
MIN_RUN_S = 0.25  # a timed run repeats a regime back to back until it lasts about this long (reps from the
# warm-up): single runs of the fastest figures (a 60 ms bundled-model batch, a 4.5 ms beam search) read
# 48-73k tok/s for lstm-infer in one run while OpenVINO read 76k five times; a wake-up or a scheduling hiccup
# then weighs on one run instead of deciding it
GAP_S = 0.2  # pause between timed runs, so that the previous engine's spinning threads have gone to sleep:
# ONNX Runtime's keep a core busy for 40-50 ms after a run (measured: 0.04 CPU-s in the first 50 ms), and with
# a 50 ms gap lstm-infer's char-model stream run after ORT's measured 10.6k tok/s against 12.8-13.2k alone or
# after OpenVINO or PyTorch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def thread_env(threads: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({k: str(threads) for k in THREAD_VARS})
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- workers

class Worker:
    """One engine process; ``run`` times one run of a regime inside it."""

    def __init__(self, engine: str, threads: int, folder: Path, model_dir: Path, info: dict, regimes: dict,
                 log_dir: Path):
        self.engine = engine
        args = {"engine": engine, "threads": threads, "folder": str(folder), "model_dir": str(model_dir),
                "spec": info["spec"], "head_bias": info.get("head_bias", True), "regimes": regimes}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{info['spec']['name']}-{threads}t-{engine}.log"
        self._err = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=thread_env(threads))
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
            return {"error": f"worker exited with status {self.proc.returncode}: {tail[0]}"}
        return json.loads(line)

    def call(self, **cmd) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except OSError:
            raise RuntimeError(f"worker is gone (see {self.log_path})") from None
        out = self._read()
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self._err.close()


def measure(res: dict, name: str, info: dict, folder: Path, mdir: Path, threads: int, args) -> None:
    """All engines on one model at one thread count: warm-up, interleaved timed rounds, agreement."""
    start = start_token(mdir, info["spec"]["tokenizer"])
    regimes = {k: {**v, "start": start} if k in ("greedy", "beam") else v
               for k, v in res["settings"]["regimes"].items() if k in args.regimes}
    workers = []
    for e in args.engines:
        t = time.perf_counter()
        w = Worker(e, threads, folder, mdir, info, regimes, Path(args.work) / "logs")
        if "error" in w.hello:
            log(f"  {e}: failed to start: {w.hello['error']}")
            res["failures"].append({"model": name, "threads": threads, "engine": e, "error": w.hello["error"]})
            w.close()
            continue
        log(f"  {e}: ready in {time.perf_counter() - t:.1f} s")
        workers.append(w)
    times: dict[tuple[str, str], list[float]] = {}
    dead: set[tuple[str, str]] = set()  # (engine, regime) that failed once: not run again
    reps: dict[tuple[str, str], int] = {}  # runs per timed call, from a sizing run after the warm-up

    def timed(w: Worker, regime: str) -> float | None:
        if (w.engine, regime) in dead:
            return None
        try:
            time.sleep(GAP_S)
            return w.call(cmd="run", regime=regime, reps=reps.get((w.engine, regime), 1))["seconds"]
        except RuntimeError as err:
            log(f"  {w.engine} {regime}: {err}")
            res["failures"].append({"model": name, "threads": threads, "engine": w.engine,
                                    "error": f"{regime}: {err}"})
            dead.add((w.engine, regime))
            return None

    for regime in regimes:
        for w in workers:
            for _ in range(args.warmup):
                timed(w, regime)
            # one more, untimed, to size the runs: a first run can include loading or compiling kernels
            s = timed(w, regime) if args.min_run_s > 0 else None
            if s:
                reps[(w.engine, regime)] = max(1, min(100, math.ceil(args.min_run_s / s)))
    for rnd in range(args.runs):
        order = workers[rnd % len(workers):] + workers[: rnd % len(workers)] if workers else []
        for regime in regimes:
            for w in order:
                s = timed(w, regime)
                if s is not None:
                    times.setdefault((w.engine, regime), []).append(s)
        log(f"  round {rnd + 1}/{args.runs} done")
    outputs = {}
    for w in workers:
        try:
            got = w.call(cmd="outputs")
            outputs[w.engine] = got["outputs"]
            res["engine_info"].append({"model": name, "threads": threads, "engine": w.engine, **got["info"]})
        except RuntimeError as err:
            res["failures"].append({"model": name, "threads": threads, "engine": w.engine, "error": str(err)})
        w.close()
    for (engine, regime), secs in times.items():
        if (engine, regime) in dead:
            continue
        med = float(np.median(secs))
        value = report.figure(regime, regimes[regime], med)
        res["timings"].append({"model": name, "regime": regime, "threads": threads, "engine": engine,
                               "seconds": secs, "median_s": med, "value": value,
                               "reps": reps.get((engine, regime), 1)})
        log(f"  {name} {regime} {threads}t {engine}: {value:,.3f}")
    res["agreement"] += agreement(name, threads, outputs)


def start_token(mdir: Path, kind: str) -> int:
    """Decoding starts from the model's start symbol (bos, else eos) as lstm-infer's generate does; without
    one, from "\\n" (byte models) or id 1."""
    cfg = json.loads((mdir / "config.json").read_text())
    tok = cfg.get("tokenizer") or {}
    sym = tok.get("bos") or tok.get("eos")
    if sym is None:
        return 10 if kind == "byte" else 1
    return json.loads((mdir / "vocab.json").read_text(encoding="utf-8")).index(sym)


def agreement(name: str, threads: int, outputs: dict) -> list[dict]:
    """Every engine's outputs against PyTorch's: max |Δ| of the target log-probs, equal decoded tokens."""
    ref = outputs.get("pytorch")
    if ref is None:
        return []
    rows = []
    for engine, out in outputs.items():
        if engine == "pytorch":
            continue
        row = {"model": name, "threads": threads, "engine": engine}
        for regime in ("batched", "stream"):
            if regime in out and regime in ref:
                row[f"{regime}_max_abs_diff"] = float(np.max(np.abs(np.asarray(out[regime]) - np.asarray(ref[regime]))))
        for regime in ("greedy", "beam"):
            if regime in out and regime in ref:
                row[f"{regime}_equal"] = out[regime] == ref[regime]
                if out[regime] != ref[regime]:
                    row[f"{regime}_first_diff"] = next(i for i, (a, b) in enumerate(zip(out[regime], ref[regime]))
                                                       if a != b) if len(out[regime]) == len(ref[regime]) else -1
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the CLI regime

def cli_line(spec: models.Spec, tokens: int = 128) -> str:
    rng = np.random.default_rng(7)
    if spec.tokenizer == "byte":
        words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo vats".split()
        text = ""
        while len(text) < tokens:
            text += words[int(rng.integers(len(words)))] + " "
        return text[:tokens].strip()
    vocab = models.synthetic_vocab(spec)
    return " ".join(vocab[int(i)] for i in rng.integers(2, spec.vocab, tokens - 1))


def cli_command() -> list[str]:
    exe = Path(sys.executable).with_name("lstm-infer")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from lstm_infer.cli import main; main()"]


def measure_cli(res: dict, name: str, spec: models.Spec, mdir: Path, threads: int, args) -> None:
    """Wall time of `lstm-infer score` on a one-line file: cold (fresh NUMBA_CACHE_DIR) and warm; as it runs
    by default (such a file takes the NumPy steps, no Numba) and with --jit (Numba's kernels)."""
    for jit in (False, True):
        _measure_cli(res, name, spec, mdir, threads, args, jit)


def _measure_cli(res: dict, name: str, spec: models.Spec, mdir: Path, threads: int, args, jit: bool) -> None:
    work = Path(args.work)
    text_file = work / f"cli-{name}.txt"
    text_file.write_text(cli_line(spec) + "\n", encoding="utf-8")
    cmd = cli_command() + ["score", "-m", str(mdir), "--threads", str(threads), "--no-progress", str(text_file)]
    cmd += ["--jit"] if jit else []

    def once(cache: str) -> float:
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads, {"NUMBA_CACHE_DIR": cache}))
        dt = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")
        return dt

    root = work / "numba-cold"
    root.mkdir(parents=True, exist_ok=True)
    try:
        cold, cache = [], ""
        for _ in range(args.cli_cold):
            cache = tempfile.mkdtemp(dir=root)
            cold.append(once(cache))
        once(cache)
        warm = [once(cache) for _ in range(args.cli_warm)]
    except RuntimeError as err:
        log(f"  cli: {err}")
        res["failures"].append({"model": name, "threads": threads, "engine": "lstm-infer", "error": f"cli: {err}"})
        return
    line = cli_line(spec)
    row = {"model": name, "threads": threads, "options": "--jit" if jit else "(default)",
           "tokens": len(line.split()) if spec.tokenizer != "byte" else len(line.encode()),
           "cold_s": cold, "warm_s": warm,
           "cold_median_s": float(np.median(cold)), "warm_median_s": float(np.median(warm)), "command": shlex.join(cmd)}
    res["cli"].append(row)
    log(f"  cli {name} {threads}t {row['options']}: cold {row['cold_median_s']:.2f} s, "
        f"warm {row['warm_median_s']:.2f} s")


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 runs, shorter decodes, the largest thread count only")
    ap.add_argument("--models", default="medium,large,char,bundled", help="comma list from: "
                    + ", ".join(list(models.REFERENCE) + ["bundled"]))
    ap.add_argument("--engines", default=None, help="comma list (default: all; openvino-bf16 only on AMX CPUs)")
    ap.add_argument("--regimes", default="batched,stream,greedy,beam,cli")
    ap.add_argument("--threads", default=None, help="comma list (default: 1, 2 and all cores)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per figure (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-run-s", type=float, default=MIN_RUN_S,
                    help=f"a timed run repeats its regime until about this long (default {MIN_RUN_S}; 0: once)")
    ap.add_argument("--greedy-tokens", type=int, default=None, help="default 200, quick 100")
    ap.add_argument("--beam-steps", type=int, default=None, help="default 50, quick 20")
    ap.add_argument("--sgemm-size", type=int, default=None, help="default 4096, quick 2048")
    ap.add_argument("--copy-mb", type=int, default=512)
    ap.add_argument("--cli-cold", type=int, default=None, help="cold CLI runs (default 2, quick 1)")
    ap.add_argument("--cli-warm", type=int, default=None, help="warm CLI runs (default 5, quick 3)")
    ap.add_argument("--bundled-dir", default=str(models.BUNDLED),
                    help="model directory benchmarked as 'bundled' (default: lstm_infer/data/default)")
    ap.add_argument("--work", default=str(HERE / "work"), help="cache of built models and worker logs")
    ap.add_argument("--out", default=str(HERE / "results"), help="where the markdown + JSON go")
    ap.add_argument("--name", default=None, help="file name stem of the results (default: date and time)")
    ap.add_argument("--keep-openblas-env", action="store_true",
                    help=f"keep {' and '.join(OPENBLAS_PINS)} (dropped by default: they pin an older OpenBLAS kernel)")
    args = ap.parse_args(argv)
    q = args.quick
    args.models = [m for m in args.models.split(",") if m]
    args.regimes = [r for r in args.regimes.split(",") if r]
    cores = os.cpu_count() or 1
    if args.threads:
        args.threads = [int(t) for t in args.threads.split(",")]
    else:
        args.threads = [cores] if q else sorted({t for t in (1, 2, cores) if t <= cores})
    amx = machine.describe()["amx"]
    args.engines = args.engines.split(",") if args.engines else \
        [e for e in engines.ENGINES if e != "openvino-bf16" or amx]
    unknown = [e for e in args.engines if e not in engines.ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; known: {', '.join(engines.ENGINES)}")
    args.runs = args.runs or (3 if q else 5)
    args.greedy_tokens = args.greedy_tokens or (100 if q else 200)
    args.beam_steps = args.beam_steps or (20 if q else 50)
    args.sgemm_size = args.sgemm_size or (2048 if q else 4096)
    args.cli_cold = args.cli_cold or (1 if q else 2)
    args.cli_warm = args.cli_warm or (3 if q else 5)
    return args


def measure_read_bandwidth(res: dict, threads: list[int], when: str) -> None:
    """res["read_bw"][model][threads]: the best GB/s so far at which that many threads read a buffer the size of
    the model's batch-1 weights (machine.read_bandwidth), the yardstick for batch-1 decoding. Measured at the
    start and at the end, like the sgemm peak: the L3 and memory are shared with the host's other tenants, and
    the same read ran at 55-64 and at 107 GB/s (46-53 MB, 2 threads) within minutes."""
    bw = res.setdefault("read_bw", {})
    for name, info in res["models"].items():
        mb = info["weight_bytes_per_token"] / 1e6
        for t in threads:
            got = machine.read_bandwidth(mb, t)
            best = bw.setdefault(name, {}).get(str(t))
            runs = (best or {}).get("gbs_runs", []) + [got["gbs_best"]]
            if best is None or got["gbs_best"] > best["gbs_best"]:
                best = got
            bw[name][str(t)] = {**best, "gbs_runs": runs}
        log(f"  read bandwidth {when}, {name} ({mb:.1f} MB): "
            + ", ".join(f"{t}t {bw[name][str(t)]['gbs_runs'][-1]:.0f}" for t in threads) + " GB/s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": shlex.join(["python", "benchmarks/run.py",
                                                                                 *(argv or sys.argv[1:])]),
                 "machine": {**machine.describe(), "dropped_env": DROPPED_PINS}, "models": {}, "skipped": {},
                 "timings": [], "failures": [], "agreement": [], "engine_info": [], "cli": [], "notes": []}
    regimes = {"batched": {"B": 32, "T": 128, "seed": 1234}, "stream": {"B": 1, "T": 512, "seed": 4321},
               "greedy": {"tokens": args.greedy_tokens}, "beam": {"beam": 5, "steps": args.beam_steps}}
    res["settings"] = {"runs": args.runs, "warmup": args.warmup, "threads": args.threads, "engines": args.engines,
                       "regimes": regimes, "min_run_s": args.min_run_s}

    log("measuring sgemm peak and copy bandwidth")
    res["sgemm"] = {str(t): machine.sgemm_peak(t, args.sgemm_size) for t in args.threads}
    res["copy"] = machine.copy_bandwidth(args.copy_mb)
    log(f"  sgemm {[round(p['gflops_best']) for p in res['sgemm'].values()]} GFLOP/s, "
        f"copy {res['copy']['gbs_best']:.1f} GB/s")

    built = {}
    for name in args.models:
        if name == "bundled":
            spec, why = models.bundled_spec(Path(args.bundled_dir))
            if spec is None:
                res["skipped"]["bundled"] = why
                log(f"skipping the bundled model: {why}")
                continue
            info = models.build_bundled(spec, work, log, Path(args.bundled_dir))
        else:
            spec = models.REFERENCE[name]
            info = models.build(spec, work, log)
        built[name] = (spec, info)
        res["models"][name] = {"spec": info["spec"], "converted_from": info["converted_from"],
                               "flops_per_token": models.flops_per_token(spec),
                               "weight_bytes_per_token": models.weight_bytes_per_token(spec)}
    measure_read_bandwidth(res, args.threads, "at the start")

    bench_regimes = [r for r in args.regimes if r in ("batched", "stream", "greedy", "beam")]
    for name, (spec, info) in built.items():
        folder, mdir = work / name, models.model_dir(info, work)
        if bench_regimes:
            for threads in args.threads:
                log(f"{name}: {threads} thread(s)")
                run_args = argparse.Namespace(**{**vars(args), "regimes": bench_regimes})
                measure(res, name, info, folder, mdir, threads, run_args)
        if "cli" in args.regimes:
            measure_cli(res, name, spec, mdir, max(args.threads), args)
    # The peak is the best the machine showed: measure again at the end, in case a neighbour was busy at first.
    for t in args.threads:
        again = machine.sgemm_peak(t, args.sgemm_size)
        first = res["sgemm"][str(t)]
        first["gflops_best"] = max(first["gflops_best"], again["gflops_best"])
        first["gflops_runs_start_end"] = [first["gflops_median"], again["gflops_median"]]
    log(f"  sgemm peak {[round(p['gflops_best']) for p in res['sgemm'].values()]} GFLOP/s (best of start and end)")
    measure_read_bandwidth(res, args.threads, "at the end")
    res["wall_s"] = time.perf_counter() - t_start
    res["notes"].append(f"total wall time of this run: {res['wall_s'] / 60:.1f} min")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or time.strftime("bench-%Y%m%d-%H%M") + ("-quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(report.markdown(res))
    log(f"wrote {out / stem}.md and .json ({res['wall_s'] / 60:.1f} min)")
    ours = [a for a in res["agreement"] if a["engine"] == "lstm-infer"]
    if any(not report.agreement_ok(a) for a in ours):
        log("lstm-infer DISAGREES with PyTorch beyond tolerance: see the agreement table")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
