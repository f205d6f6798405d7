"""Bounded memory: the peak RSS of ``lstm-infer score`` does not grow with the input's size or its line length.

Each run is a fresh process that reports its own VmHWM. A tiny word model keeps the runs short:
its tokens are long words, so tens of MB of text are a few million tokens. Measured on the 2-core dev box:
about 154 MB (mostly NumPy and Numba) for 5 MB of text, and the same within 1 MB for 60 MB and for one 50 MB line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_hostile import tiny_model

MB = 1 << 20


# The child reads its own VmHWM at exit. Not ru_maxrss: Linux carries the pre-exec (forked pytest) high-water
# mark into the child's ru_maxrss, which would hide everything below pytest's own size.
CHILD = """
import atexit, re, sys
report = sys.argv.pop(1)
def hwm():
    with open("/proc/self/status") as f, open(report, "w") as out:
        out.write(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))
atexit.register(hwm)
from lstm_infer.cli import main
main()
"""


def peak_rss_mb(args: list[str], tmp_path) -> tuple[float, dict]:
    """Run the CLI in a child process: (its peak RSS in MB, its JSON output)."""
    out, report = tmp_path / "out.json", tmp_path / "hwm.txt"
    with open(out, "wb") as fo:
        res = subprocess.run([sys.executable, "-c", CHILD, str(report), *args], stdout=fo, stderr=subprocess.PIPE,
                             text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return int(report.read_text()) / 1024, json.loads(out.read_text())


def write_text(path, size: int, line_words: int, rng) -> int:
    """About ``size`` bytes of lines of ``line_words`` words ('a', 'b' or a 40-letter unknown word); returns words."""
    words = np.array(["a", "b", "q" * 40])
    block = [" ".join(rng.choice(words, line_words)) + "\n" for _ in range(64)]
    chunk = "".join(block).encode()
    n_words = 64 * line_words
    reps = max(1, size // len(chunk))
    with open(path, "wb") as f:
        for _ in range(reps):
            f.write(chunk)
    return reps * n_words


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("mem") / "m", "word", E=4, H=8)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_peak_rss_does_not_grow_with_input(model, tmp_path):
    rng = np.random.default_rng(0)
    small, big, long_line = tmp_path / "small.txt", tmp_path / "big.txt", tmp_path / "line.txt"
    n_small = write_text(small, 5 * MB, 40, rng)
    n_big = write_text(big, 60 * MB, 40, rng)
    word = b"w" * 999 + b" "
    long_line.write_bytes(word * (50 * MB // len(word)) + b"\n")
    common = ["-m", str(model), "--threads", "1", "--batch-size", "512", "--format", "json"]
    rss = {}
    for name, path, words in (("5 MB", small, n_small), ("60 MB", big, n_big), ("one 50 MB line", long_line, None)):
        rss[name], res = peak_rss_mb(["score", str(path), *common], tmp_path)
        if words is not None:  # every word and every line's eos was scored: nothing skipped to save memory
            assert res["tokens"] == words + words // 40
        else:
            assert res["tokens"] == 50 * MB // len(word) + 1 and res["lines_scored"] == 1
    report = ", ".join(f"{k}: {v:.0f} MB" for k, v in rss.items())
    print(f"peak RSS {report}")
    # 55 MB more text, or one line of 50 MB, may cost a few MB of buffers, never a copy of the input.
    assert rss["60 MB"] - rss["5 MB"] < 16, report
    assert rss["one 50 MB line"] - rss["5 MB"] < 16, report
