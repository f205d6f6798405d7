"""The NumPy path for short one-shot jobs (eager.py): PyTorch's numbers, the ONNX extras against the naive
steps, the kernels' numbers, and a small `lstm-infer score` that never imports Numba."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lstm_infer import eager, load, recurrent  # noqa: E402
from lstm_infer.cli import EAGER_BYTES, _small_files  # noqa: E402
from lstm_infer.layers import zero_state  # noqa: E402
from lstm_infer.workers import Workers  # noqa: E402
from tests.test_fused import _direction, reference  # noqa: E402
from tests.util import assert_close, engine_from_torch, scramble  # noqa: E402

rng = np.random.default_rng(11)
LSTMS = [dict(num_layers=1), dict(num_layers=2), dict(num_layers=2, bidirectional=True),
         dict(num_layers=2, proj_size=5), dict(num_layers=2, proj_size=4, bidirectional=True)]


def u(*shape, scale=1.0):
    return (rng.uniform(-1, 1, shape) * scale).astype(np.float32)


@pytest.mark.parametrize("kw", LSTMS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_stack_matches_torch(kw, tmp_path):
    """Ragged rows (each ends on its own last valid state) and a given initial state, as nn.LSTM runs them
    row by row."""
    rnn = nn.LSTM(7, 9, **kw)
    scramble(rnn, 3)
    model = engine_from_torch(rnn.eval(), "lstm", tmp_path)
    T, B = 8, 3
    x = u(T, B, 7)
    lengths = np.array([8, 5, 1])
    valid = np.arange(T)[:, None] < lengths[None, :]
    state = zero_state(model.layers, B)
    for h, c in state:
        h[...], c[...] = u(*h.shape), u(*c.shape)
    h0 = torch.from_numpy(np.stack([h for h, _ in state]))
    c0 = torch.from_numpy(np.stack([c for _, c in state]))
    out = eager.run_stack(model.layers, x, state, valid)
    for b in range(B):
        n = lengths[b]
        with torch.no_grad():
            ref, (rh, rc) = rnn(torch.from_numpy(x[:n, b:b + 1]), (h0[:, b:b + 1], c0[:, b:b + 1]))
        assert_close(out[:n, b], ref[:, 0].numpy())
        assert (out[n:, b] == 0).all()
        assert_close(np.stack([h[b] for h, _ in state]), rh[:, 0].numpy())
        assert_close(np.stack([c[b] for _, c in state]), rc[:, 0].numpy())


@pytest.mark.parametrize("peep,clip,input_forget,reverse", [
    (True, None, False, False), (False, 0.7, False, True), (True, 0.9, True, False), (False, None, True, True)])
def test_onnx_options_match_naive_steps(peep, clip, input_forget, reverse):
    """Peepholes, clip and the coupled input-forget gate (ONNX's LSTM) against tests/naive.py in float64, on
    test_fused's layers (weights scaled so that a wrong gate order or an ignored clip shows)."""
    T, B, I, H = 9, 4, 5, 12
    ly = _direction(I, H, peep, clip, input_forget, reverse)
    dw = ly.dirs[0]
    x, h0, c0 = u(T, B, I), u(B, H), u(B, H)
    valid = np.arange(T)[:, None] < np.array([9, 3, 0, 7])[None, :]
    h, c = h0.copy(), c0.copy()
    out = eager.run_stack([ly], x, [(h, c)], valid)
    ref_out, ref_h, ref_c = reference(x, dw.w_ih, dw.w_hh, dw.bias, dw.peep, clip, input_forget, valid, reverse,
                                      h0, c0)
    assert_close(out, ref_out)
    assert_close(h, ref_h)
    assert_close(c, ref_c)
    # and the kernels agree (they are tested against the same steps)
    h2, c2 = h0.copy(), c0.copy()
    assert_close(recurrent.run_lstm_t(ly, dw, x, h2, c2, valid, Workers(1)), out)
    assert_close(h2, h)
    assert_close(c2, c)


def _lm(tmp_path, jit, cell="lstm"):
    torch.manual_seed(5)
    mods = nn.Embedding(50, 6), {"lstm": nn.LSTM, "gru": nn.GRU}[cell](6, 10, 2), nn.Linear(10, 50)
    for m in mods:
        scramble(m, 5, 0.6)
    model = engine_from_torch(mods[1], cell, tmp_path, embedding=mods[0], head=mods[2])
    return load(model.path, threads=2, jit=jit), mods


def test_target_log_probs_matches_torch_and_kernels(tmp_path):
    eager_model, mods = _lm(tmp_path, jit=False)
    assert eager_model._eager
    jit_model, _ = _lm(tmp_path / "j", jit=True)
    ids = rng.integers(0, 50, (13, 3))
    lengths = np.array([12, 4, 12])
    lp, (h, c) = eager_model.target_log_probs(ids[:-1], ids[1:], lengths=lengths)
    emb, rnn, head = mods
    for b, n in enumerate(lengths):  # each row alone, as far as it goes
        with torch.no_grad():
            out, (rh, rc) = rnn(emb(torch.from_numpy(ids[:n, b:b + 1])))
            ref = torch.log_softmax(head(out).double(), -1)[torch.arange(n), 0, torch.from_numpy(ids[1:n + 1, b])]
        assert_close(lp[:n, b], ref.numpy())
        assert (lp[n:, b] == 0).all()
        assert_close(h[:, b], rh[:, 0].numpy())
        assert_close(c[:, b], rc[:, 0].numpy())
    lp2, (h2, c2) = jit_model.target_log_probs(ids[:-1], ids[1:], lengths=lengths)
    assert_close(lp, lp2)
    assert_close(c, c2)
    for shape in ((0, 2), (2, 0), (0, 0)):
        empty = np.zeros(shape, np.int64)
        assert eager_model.target_log_probs(empty, empty)[0].shape == shape
    # state carried: two halves = the whole
    a, st = eager_model.target_log_probs(ids[:6], ids[1:7])
    b, _ = eager_model.target_log_probs(ids[6:-1], ids[7:], state=st)
    assert_close(np.concatenate([a, b]), eager_model.target_log_probs(ids[:-1], ids[1:])[0])


def test_other_cells_take_the_kernels(tmp_path):
    model, mods = _lm(tmp_path, jit=False, cell="gru")
    assert not model._eager and not eager.fits(model.layers)
    ids = rng.integers(0, 50, (6, 2))
    emb, rnn, head = mods
    with torch.no_grad():
        out, _ = rnn(emb(torch.from_numpy(ids[:-1])))
        ref = torch.log_softmax(head(out).double(), -1)
    want = np.take_along_axis(ref.numpy(), ids[1:, :, None], 2)[..., 0]
    assert_close(model.target_log_probs(ids[:-1], ids[1:])[0], want)


def test_small_files(tmp_path):
    small, big = tmp_path / "s.txt", tmp_path / "b.txt"
    small.write_text("a b c\n")
    big.write_bytes(b"x" * (EAGER_BYTES + 1))
    assert _small_files((str(small),)) and _small_files((str(small), str(small)))
    assert not _small_files((str(big),)) and not _small_files((str(small), str(big)))
    assert not _small_files(()) and not _small_files(("-",)) and not _small_files((str(tmp_path / "missing"),))


def test_small_cli_score_never_imports_numba(tmp_path):
    """The bundled model on a one-line file: the same totals as --jit, and Numba stays unimported."""
    f = tmp_path / "one.txt"
    f.write_text("The quick brown fox jumps over the lazy dog.\n")
    code = ("import sys; from lstm_infer.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('numba loaded:', 'numba' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = {}
    for flag in ("", "--jit"):
        args = [sys.executable, "-c", code, "score", "--format", "json", "--no-progress", str(f)] + \
            ([flag] if flag else [])
        runs[flag] = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert runs[flag].returncode == 0, runs[flag].stderr
    assert runs[""].stdout.rstrip().endswith("numba loaded: False")
    assert runs["--jit"].stdout.rstrip().endswith("numba loaded: True")
    a, b = (json.loads(r.stdout.rsplit("\n", 2)[0]) for r in (runs[""], runs["--jit"]))
    assert a["tokens"] == b["tokens"] > 40
    assert abs(a["log_prob"] - b["log_prob"]) < 1e-3
