"""Benchmark results (the JSON run.py saves) -> figures, ratios, roofline shares -> a markdown report."""

from __future__ import annotations

import math

from engines import FP32_PEERS, LABELS

AGREEMENT_TOL = 1e-4  # max |lstm-infer - PyTorch| over target log-probs
PERF_COLUMNS = ["model", "regime", "threads", *[LABELS[e] for e in LABELS], "best fp32 peer",
                "lstm-infer vs best", "lstm-infer GFLOP/s (% sgemm peak)", "best peer GFLOP/s (% peak)",
                "weights read / token", "lstm-infer GB/s (% read bw)", "best peer GB/s (% read bw)"]
AGREE_COLUMNS = ["model", "threads", "engine", "batched max abs diff vs PyTorch", "stream max abs diff vs PyTorch",
                 "greedy = PyTorch", "beam = PyTorch"]


def regime_label(name: str, r: dict) -> str:
    return {"batched": f"batched B{r.get('B')}×T{r.get('T')} (tok/s)", "stream": f"stream B{r.get('B')}×T{r.get('T')} "
            "(tok/s)", "greedy": f"greedy {r.get('tokens')} tok (ms/token)",
            "beam": f"beam {r.get('beam')} × {r.get('steps')} steps (ms/step)"}[name]


def figure(name: str, r: dict, seconds: float) -> float:
    """One run's time -> the regime's figure: tok/s (scoring, higher is better) or ms (decoding, lower)."""
    if name in ("batched", "stream"):
        return r["B"] * r["T"] / seconds
    per = r["tokens"] if name == "greedy" else r["steps"]
    return 1000.0 * seconds / per


def higher_is_better(name: str) -> bool:
    return name in ("batched", "stream")


def rows_per_second(name: str, r: dict, value: float) -> float:
    """Token-rows processed per second (beam: k rows per step), for the FLOP rate."""
    if higher_is_better(name):
        return value
    rows = r["beam"] if name == "beam" else 1
    return rows * 1000.0 / value


def steps_per_second(name: str, value: float) -> float | None:
    """Weight passes per second for batch-1 decoding (one pass per token / beam step), else None."""
    return None if higher_is_better(name) else 1000.0 / value


def _num(v: float, name: str) -> str:
    return f"{v:,.0f}" if higher_is_better(name) else f"{v:.3g}" if v < 10 else f"{v:.1f}"


def _pct(x: float, ref: float | None) -> str:
    num = f"{x:,.0f}" if x >= 10 else f"{x:.2g}"
    return f"{num} ({100 * x / ref:.0f}%)" if ref else num


def _gflops(value: float | None, ctx: tuple) -> str:
    """Achieved GFLOP/s of a figure and its share of the sgemm peak at that thread count."""
    name, r, info, peak, _ = ctx
    if not value:
        return ""
    return _pct(rows_per_second(name, r, value) * info["flops_per_token"]["total"] / 1e9, peak)


def _gbs(value: float | None, ctx: tuple) -> str:
    """Weight bytes read per second by batch-1 decoding and their share of the read bandwidth measured for a
    buffer of that size on as many threads (run.measure_read_bandwidth)."""
    name, _, info, _, bw = ctx
    steps = steps_per_second(name, value) if value else None
    if not steps:
        return ""
    gbs = steps * info["weight_bytes_per_token"] / 1e9
    return f"{gbs:.1f} ({100 * gbs / bw:.0f}%)" if bw else f"{gbs:.1f}"


def round_ratios(ours: list[float], peer: list[float]) -> list[float]:
    """lstm-infer's speed over a peer's, round by round, from their seconds per run in round order (the same work
    per run, so speed ratio = peer seconds / ours); [] when the rounds do not line up. Against the peer whose
    median is best, the medians' ratio always lies within this range (each run of one engine bounded by a
    constant times the other's bounds their medians alike)."""
    if not ours or len(peer) != len(ours):
        return []
    return [p / o for p, o in zip(peer, ours)]


def _ratio(ours: float, peer: float, name: str, rounds: list[float]) -> str:
    """'1.21× (1.18-1.24)': medians' ratio, then the lowest and highest round's (round_ratios)."""
    r = ours / peer if higher_is_better(name) else peer / ours
    return f"{r:.2f}×" + (f" ({min(rounds):.2f}-{max(rounds):.2f})" if len(rounds) > 1 else "")


def perf_rows(res: dict) -> list[list[str]]:
    """One row per (model, regime, threads), in the order they were measured."""
    table: dict[tuple, dict] = {}  # (model, regime, threads) -> {engine: timing entry}
    for m in res["timings"]:
        table.setdefault((m["model"], m["regime"], m["threads"]), {})[m["engine"]] = m
    rows = []
    for (model, name, threads), timed in table.items():
        vals = {e: m["value"] for e, m in timed.items()}
        r = res["settings"]["regimes"][name]
        best_fn = max if higher_is_better(name) else min
        peers = {e: v for e, v in vals.items() if e in FP32_PEERS}
        best_e = best_fn(peers, key=peers.get) if peers else None
        ours = vals.get("lstm-infer")
        ratio = ""
        if ours and best_e:
            rounds = round_ratios(timed["lstm-infer"].get("seconds", []), timed[best_e].get("seconds", []))
            ratio = _ratio(ours, peers[best_e], name, rounds)
        info = res["models"][model]
        read_bw = res.get("read_bw", {}).get(model, {}).get(str(threads), {}).get("gbs_best")
        ctx = (name, r, info, res["sgemm"].get(str(threads), {}).get("gflops_best"), read_bw)
        rows.append([model, regime_label(name, r), str(threads)]
                    + [_num(vals[e], name) if e in vals else "–" for e in LABELS]
                    + [LABELS[best_e] if best_e else "–", ratio, _gflops(ours, ctx), _gflops(peers.get(best_e), ctx),
                       "" if higher_is_better(name) else f"{info['weight_bytes_per_token'] / 1e6:.1f} MB",
                       _gbs(ours, ctx), _gbs(peers.get(best_e), ctx)])
    return rows


def agreement_ok(a: dict) -> bool:
    """lstm-infer's numbers match PyTorch: log-probs within AGREEMENT_TOL, greedy tokens identical."""
    diffs = [a.get(k) for k in ("batched_max_abs_diff", "stream_max_abs_diff") if a.get(k) is not None]
    return all(d <= AGREEMENT_TOL for d in diffs) and a.get("greedy_equal") is not False


def _diff(d: float | None) -> str:
    return "–" if d is None else "nan" if math.isnan(d) else f"{d:.1e}"


def agree_rows(res: dict) -> list[list[str]]:
    rows = []
    for a in res["agreement"]:
        mark = "" if a["engine"] != "lstm-infer" else (" ✓" if agreement_ok(a) else " ✗ FAILS")
        eq = lambda v: "–" if v is None else "yes" if v else "no"  # noqa: E731
        rows.append([a["model"], str(a["threads"]), LABELS[a["engine"]] + mark, _diff(a.get("batched_max_abs_diff")),
                     _diff(a.get("stream_max_abs_diff")), eq(a.get("greedy_equal")), eq(a.get("beam_equal"))])
    return rows


def _reps(res: dict) -> str:
    """'1-40' style range of the repetitions per timed run, over every figure of the run."""
    r = [t.get("reps", 1) for t in res["timings"]]
    return f"{min(r)}-{max(r)}" if r and min(r) != max(r) else str(r[0] if r else 1)


def _read_bw(res: dict) -> str:
    """'medium 53.1 MB: 1t 37, 2t 107 GB/s; ...' from res["read_bw"]."""
    out = []
    for model, by_t in res["read_bw"].items():
        mb = next(iter(by_t.values()))["mbytes"]
        out.append(f"{model} {mb:.3g} MB: " + ", ".join(f"{t}t {v['gbs_best']:.0f}" for t, v in by_t.items())
                   + " GB/s")
    return "; ".join(out)


def _table(cols: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _source(src: dict) -> str:
    if not src:
        return "unknown source"
    dirty = src.get("uncommitted") or []
    return (f"commit {src.get('commit') or '?'} ({src['path']})"
            + (f", with uncommitted changes to {', '.join(dirty)}" if dirty else ", clean"))


def markdown(res: dict) -> str:
    """The whole report: machine, performance table, agreement table, CLI table, notes."""
    mc = res["machine"]
    v = mc["versions"]
    st = res["settings"]
    peaks = ", ".join(f"{t} thread{'s' if int(t) > 1 else ''}: {p['gflops_best']:.0f} GFLOP/s"
                      for t, p in res["sgemm"].items())
    parts = [
        f"# lstm-infer benchmark ({res['date']})",
        "",
        f"Command: `{res['command']}`",
        "",
        f"- lstm-infer: {_source(mc.get('engine_source') or {})}",
        f"- CPU: {mc['cpu']}, {mc['cores']} cores; caches per core {mc['caches_per_core']}; "
        f"{', '.join(mc['simd'])}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + f"; Python {mc['python']}; "
        f"NumPy BLAS {', '.join(mc['numpy_blas'])}"
        + (f" (removed for the run: {', '.join(f'{k}={v}' for k, v in mc['dropped_env'].items())})"
           if mc.get("dropped_env") else ""),
        f"- sgemm peak (NumPy float32 {next(iter(res['sgemm'].values()))['n']}³, best run at the start or the end): "
        f"{peaks}",
        f"- Copy bandwidth (np.copyto {res['copy']['mbytes']} MB, read + write, 1 thread): "
        f"{res['copy']['gbs_best']:.1f} GB/s",
        *([f"- Read bandwidth (each thread sums its part of a buffer the size of the model's batch-1 weights, "
           f"over and over; best at the start or the end): {_read_bw(res)}"] if res.get("read_bw") else []),
        f"- Medians of {st['runs']} runs after {st['warmup']} warm-up run(s); engines interleaved round by round, "
        "each in its own process with OMP/MKL/OpenBLAS/Numba threads set to the thread count"
        + (f"; a run repeats the regime back to back until it lasts about {st['min_run_s']} s and counts the mean "
           f"(repetitions per run, sized by one run after the warm-up: {_reps(res)})." if st.get("min_run_s")
           else "."),
        "",
        "## Speed",
        "",
        "Scoring figures are tokens/s (higher is better) and include log-softmax and the gather of the targets' "
        "log-probs; decoding figures are ms (lower is better). *lstm-infer vs best* is lstm-infer's speed "
        "divided by the best fp32 peer's (above 1: lstm-infer is faster), from the medians; in brackets the lowest and "
        "highest of the same ratio round by round, lstm-infer's run against that peer's run in the same round "
        "(how far the host's load moved the ratio during the run; the medians' ratio lies within it). OV bf16 is "
        "OpenVINO's default on AMX CPUs: not fp32, so it is never the best peer. GFLOP/s count 2·4H·(I+H) per "
        "LSTM layer + 2·H·V per token (beam: per row); GB/s count the float32 weights one batch-1 step reads "
        "(LSTM + head) once per token or beam step, as a share of the read bandwidth above for that model and "
        "thread count.",
        "",
        _table(PERF_COLUMNS, perf_rows(res)),
        "",
        "## Numerical agreement (same run, same inputs)",
        "",
        f"lstm-infer must stay within {AGREEMENT_TOL:g} of PyTorch on every target log-prob and produce the same "
        "greedy tokens.",
        "",
        _table(AGREE_COLUMNS, agree_rows(res)),
    ]
    if res.get("cli"):
        parts += ["", "## `lstm-infer score` on a one-line file (wall time of the whole command)", "",
                  "A one-line file takes the NumPy steps by default (no Numba); `--jit` runs Numba's kernels.", "",
                  _table(["model", "threads", "options", "tokens", "cold: fresh Numba cache (s)", "warm (s)"],
                         [[c["model"], str(c["threads"]), c.get("options", "--jit"), str(c["tokens"]),
                           f"{c['cold_median_s']:.2f}", f"{c['warm_median_s']:.2f}"] for c in res["cli"]])]
    notes = [f"- {m}: built from {i['converted_from']}" for m, i in res["models"].items()]
    notes += [f"- {m}: skipped ({why})" for m, why in res.get("skipped", {}).items()]
    notes += [f"- {f['model']} / {f['threads']} threads / {f['engine']}: failed ({f['error']})"
              for f in res.get("failures", [])]
    notes += [f"- {n}" for n in res.get("notes", [])]
    if notes:
        parts += ["", "## Notes", "", *notes]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """python benchmarks/report.py RUN.json ...: write each run's markdown report again, as RUN.md beside it
    (after a change to this module; the JSON holds every timed run)."""
    import json
    import sys
    from pathlib import Path

    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print("usage: python benchmarks/report.py RUN.json ...", file=sys.stderr)
        return 2
    for p in map(Path, paths):
        p.with_suffix(".md").write_text(markdown(json.loads(p.read_text())))
        print(p.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
