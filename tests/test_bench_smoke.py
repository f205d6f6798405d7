"""Smoke test of the benchmark harness: one tiny run end to end (no timing assertions)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def test_tiny_run_makes_table_and_agrees(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--models", "tiny", "--engines",
           "lstm-infer,pytorch,onnxruntime", "--regimes", "batched,greedy", "--threads", "1", "--runs", "1",
           "--warmup", "1", "--min-run-s", "0.05", "--greedy-tokens", "20", "--sgemm-size", "128", "--copy-mb", "8",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "res"), "--name", "smoke"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    md = (tmp_path / "res" / "smoke.md").read_text()
    res = json.loads((tmp_path / "res" / "smoke.json").read_text())

    header = next(line for line in md.splitlines() if line.startswith("| model | regime |"))
    for col in ("lstm-infer", "PyTorch", "ORT", "best fp32 peer", "lstm-infer vs best",
                "lstm-infer GFLOP/s (% sgemm peak)", "weights read / token", "lstm-infer GB/s (% read bw)"):
        assert f"| {col} |" in header
    rows = [line for line in md.splitlines() if line.startswith(("| tiny | batched", "| tiny | greedy"))]
    assert len(rows) == 2

    got = {(t["engine"], t["regime"]) for t in res["timings"]}
    assert got == {(e, r) for e in ("lstm-infer", "pytorch", "onnxruntime") for r in ("batched", "greedy")}
    assert all(t["value"] > 0 and len(t["seconds"]) == 1 for t in res["timings"])
    # the tiny model's runs last well under 0.05 s: each timed run repeats its regime
    assert all(t["reps"] > 1 for t in res["timings"]), [(t["engine"], t["regime"], t["reps"]) for t in res["timings"]]
    assert "repeats the regime back to back" in md
    assert res["models"]["tiny"]["flops_per_token"]["total"] == 2 * 4 * 16 * 32 * 2 + 2 * 16 * 50
    assert res["sgemm"]["1"]["gflops_best"] > 0 and res["copy"]["gbs_best"] > 0
    bw = res["read_bw"]["tiny"]["1"]  # measured at the start and the end, the best kept
    assert bw["gbs_best"] == max(bw["gbs_runs"]) > 0 and len(bw["gbs_runs"]) == 2
    assert abs(bw["mbytes"] - res["models"]["tiny"]["weight_bytes_per_token"] / 1e6) < 0.01
    assert "Read bandwidth" in md and re.search(r"tiny [0-9.]+ MB: 1t [0-9]+ GB/s", md)

    ours = next(a for a in res["agreement"] if a["engine"] == "lstm-infer")
    assert ours["batched_max_abs_diff"] <= 1e-4
    assert ours["greedy_equal"] is True
    assert not res["failures"]


def test_denormals_script_measures_denormal_states():
    """benchmarks/denormals.py really feeds denormal h into the steps (else it measures nothing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import denormals

    _, share = denormals.per_step(1, 64, 1e-39, n=8, runs=1)
    _, none = denormals.per_step(1, 64, 1e-3, n=8, runs=1)
    assert share == 1.0 and none == 0.0


def test_round_ratios_pair_rounds_and_bracket_the_medians_ratio():
    """The report's per-round range: round i's lstm-infer time against the best peer's round i; the medians'
    ratio always lies within it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    ours, peer = [1.0, 2.0, 1.0, 4.0], [2.0, 2.0, 1.5, 3.0]
    assert report.round_ratios(ours, peer) == [2.0, 1.0, 1.5, 0.75]
    assert report.round_ratios([1.0, 1.0], [2.0]) == []  # rounds that do not line up
    # scoring figures are tok/s (higher is better), decoding ms (lower): the same ratio of speeds either way
    assert report._ratio(120.0, 100.0, "batched", [1.0, 1.5, 1.2]) == "1.20× (1.00-1.50)"
    assert report._ratio(1.0, 2.0, "greedy", [2.0]) == "2.00×"
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 8))
        o, p = rng.uniform(0.5, 2.0, n), rng.uniform(0.5, 2.0, n)
        r = report.round_ratios(list(o), list(p))
        assert min(r) - 1e-12 <= np.median(p) / np.median(o) <= max(r) + 1e-12
