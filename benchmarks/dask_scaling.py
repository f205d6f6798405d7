"""Throughput of `lstm_infer.distributed.score_files` with 1 and 2 worker processes (issue 9's scaling row).

    python benchmarks/dask_scaling.py [--mb 0.4] [--runs 2]

Scores a few MB of the bundled corpus-like text (repeated held-out English) with the bundled model on a
LocalCluster of 1, then 2, single-threaded worker processes, next to a local single-process run at 1 thread,
and prints a markdown table (tokens/s, median of --runs, after one warm-up run that also pays Numba's cache
load in every worker). Needs `pip install -e ".[dask]"`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lstm_infer
from lstm_infer.distributed import local_cluster, score_files

HELDOUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "heldout.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=0.4, help="MB of text, split over 4 files")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    import distributed

    text = HELDOUT.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        per_file = int(args.mb * 1e6 / 4)
        files = []
        for k in range(4):
            p = Path(tmp) / f"part{k}.txt"
            p.write_text((text * (per_file // len(text) + 1))[:per_file].rsplit("\n", 1)[0] + "\n", encoding="utf-8")
            files.append(str(p))
        model = lstm_infer.load(threads=1)
        rows = []

        def timed(fn) -> tuple[float, int]:
            fn()  # warm-up
            times, tokens = [], 0
            for _ in range(args.runs):
                t = time.perf_counter()
                tokens = fn()
                times.append(time.perf_counter() - t)
            return tokens / statistics.median(times), tokens

        def local() -> int:
            total = 0
            for f in files:
                total += model.score(Path(f).read_text(encoding="utf-8")).tokens
            return total

        rate, tokens = timed(local)
        rows.append(("local, 1 process, 1 thread", rate))
        for n in (1, 2):
            with local_cluster(n) as cluster, distributed.Client(cluster) as client:
                rate, _ = timed(lambda c=client: score_files(files, client=c, threads=1).total.tokens)
            rows.append((f"Dask LocalCluster, {n} worker process{'es' if n > 1 else ''} x 1 thread", rate))
    print(f"{tokens:,} tokens ({args.mb} MB in 4 files), bundled model, sentences mode, median of {args.runs}\n")
    print("| setup | tokens/s | vs 1 worker |\n|---|---|---|")
    one = rows[1][1]
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / one:.2f}x |")


if __name__ == "__main__":
    main()
