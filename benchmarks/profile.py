"""Run one lstm-infer regime in a loop, for a sampling profiler to look at.

    python benchmarks/profile.py --model medium --regime batched --seconds 20
    py-spy record -r 200 -f raw -o prof.txt -- python benchmarks/profile.py --model medium --regime stream
    python benchmarks/profile.py --summarize prof.txt      # self time by function, then by source line

The model must have been built by run.py (benchmarks/work/<model>/model).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def loop(args) -> None:
    import models
    import worker
    from engines import LstmInfer

    spec = models.bundled_spec(models.BUNDLED)[0] if args.model == "bundled" else models.REFERENCE[args.model]
    where = models.BUNDLED if args.model == "bundled" else Path(args.work) / args.model / "model"
    eng = LstmInfer(where, args.threads)
    start = eng.start_symbol if eng.start_symbol is not None else 1
    regimes = {"batched": {"B": 32, "T": 128, "seed": 1234}, "stream": {"B": 1, "T": 512, "seed": 4321},
               "greedy": {"tokens": 200, "start": start}, "beam": {"beam": 5, "steps": 50, "start": start}}
    data = worker.regime_inputs(regimes, spec.vocab)
    worker.run_regime(eng, args.regime, regimes, data)  # compile / warm
    t_end, n = time.perf_counter() + args.seconds, 0
    while time.perf_counter() < t_end:
        worker.run_regime(eng, args.regime, regimes, data)
        n += 1
    print(f"{n} runs of {args.regime} on {args.model} in {args.seconds} s", file=sys.stderr)


def summarize(path: str, top: int = 15) -> None:
    """py-spy raw (collapsed) stacks -> the leaf frame's share of samples, by function and by line."""
    by_func: collections.Counter = collections.Counter()
    by_line: collections.Counter = collections.Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        # The innermost Python frame is the one whose line says what the engine was doing.
        py = [f for f in frames if ".py:" in f]
        leaf = py[-1] if py else frames[-1]
        by_line[leaf] += n
        by_func[leaf.split(" (")[0] + " (" + leaf.split(" (")[-1].split(":")[0] + ")" if " (" in leaf else leaf] += n
    for title, ctr in (("by function", by_func), ("by line", by_line)):
        print(f"--- {title} ({total} samples)")
        for k, v in ctr.most_common(top):
            print(f"{100 * v / total:5.1f}%  {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medium")
    ap.add_argument("--regime", default="batched", choices=["batched", "stream", "greedy", "beam"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--work", default=str(HERE / "work"))
    ap.add_argument("--summarize", metavar="RAW_FILE", help="summarize a py-spy raw profile instead")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        loop(args)


if __name__ == "__main__":
    main()
