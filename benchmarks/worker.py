"""One engine, one model, one thread count, in its own process: the driver (run.py) talks to it over pipes.

    python benchmarks/worker.py '<json: engine, threads, folder, model_dir, spec, head_bias, regimes>'

The worker answers one JSON line per request line on its stdout (everything the libraries print goes to
stderr instead):

    {"cmd": "run", "regime": "batched", "reps": 3}   -> {"seconds": 0.41}   ``reps`` (default 1) back-to-back
                                          runs on the fixed inputs, timed together: the mean seconds per run
    {"cmd": "outputs"}                    -> {"outputs": {...}}  the last result of every regime run so far
    {"cmd": "quit"}
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REGIMES = ("batched", "stream", "greedy", "beam")


def regime_inputs(regimes: dict, vocab: int) -> dict:
    """The fixed inputs every engine gets: token ids (T + 1, B) from a seeded generator, split into
    inputs (T, B) and targets (T, B) = the next token; decoding starts from token ``start``."""
    out = {}
    for name in ("batched", "stream"):
        if name in regimes:
            r = regimes[name]
            ids = np.random.default_rng(r["seed"]).integers(0, vocab, (r["T"] + 1, r["B"]), dtype=np.int64)
            out[name] = (np.ascontiguousarray(ids[:-1]), np.ascontiguousarray(ids[1:]))
    return out


def run_regime(engine, name: str, regimes: dict, data: dict):
    r = regimes[name]
    if name in ("batched", "stream"):
        return engine.score(*data[name])
    if name == "greedy":
        return engine.greedy(r["start"], r["tokens"])
    if name == "beam":
        return engine.beam(r["start"], r["beam"], r["steps"])
    raise ValueError(f"unknown regime {name!r}")


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library chatter goes to stderr, the protocol keeps stdout to itself
    sys.stdout = sys.stderr
    args = json.loads(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import engines
    from models import Spec

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        t0 = time.perf_counter()
        spec = Spec(**args["spec"])
        engine = engines.make(args["engine"], Path(args["folder"]), Path(args["model_dir"]), args["threads"], spec,
                              args.get("head_bias", True))
        data = regime_inputs(args["regimes"], spec.vocab)
        reply({"ready": True, "load_s": time.perf_counter() - t0})
    except Exception as err:  # noqa: BLE001 - reported to the driver, which records the engine as failed
        traceback.print_exc()
        reply({"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
        return
    last: dict = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "run":
                reps = int(cmd.get("reps", 1))
                t = time.perf_counter()
                for _ in range(reps):
                    res = run_regime(engine, cmd["regime"], args["regimes"], data)
                dt = (time.perf_counter() - t) / reps
                last[cmd["regime"]] = np.asarray(res).tolist()
                reply({"seconds": dt})
            elif cmd["cmd"] == "outputs":
                reply({"outputs": last, "info": engine.info()})
            elif cmd["cmd"] == "quit":
                return
            else:
                reply({"error": f"unknown command {cmd['cmd']!r}"})
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            reply({"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})


if __name__ == "__main__":
    main()
