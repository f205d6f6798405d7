"""The engine against torch.nn.LSTM / GRU / RNN: every option PyTorch has, ragged batches, state."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lstm_infer import recurrent  # noqa: E402
from tests.util import assert_close, engine_from_torch, np_state, scramble  # noqa: E402

CASES = [
    # cell, ctor kwargs
    ("lstm", dict(num_layers=1)),
    ("lstm", dict(num_layers=2)),
    ("lstm", dict(num_layers=2, bidirectional=True)),
    ("lstm", dict(num_layers=2, proj_size=5)),
    ("lstm", dict(num_layers=2, proj_size=4, bidirectional=True)),
    ("lstm", dict(num_layers=1, bias=False)),
    ("gru", dict(num_layers=2)),
    ("gru", dict(num_layers=2, bidirectional=True)),
    ("rnn", dict(num_layers=2, nonlinearity="tanh")),
    ("rnn", dict(num_layers=2, nonlinearity="relu", bidirectional=True)),
]
CTORS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def make(cell, kw, seed, I=7, H=9):
    rnn = CTORS[cell](I, H, **kw)
    scramble(rnn, seed)
    return rnn.eval()


def rand_state(rnn, cell, B, rng):
    D = 2 if rnn.bidirectional else 1
    hout = getattr(rnn, "proj_size", 0) or rnn.hidden_size
    h = rng.standard_normal((rnn.num_layers * D, B, hout)).astype(np.float32)
    if cell != "lstm":
        return h, None
    return h, rng.standard_normal((rnn.num_layers * D, B, rnn.hidden_size)).astype(np.float32)


@pytest.mark.parametrize("cell,kw", CASES, ids=[f"{c}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for c, kw in CASES])
def test_matches_torch(cell, kw, tmp_path):
    rng = np.random.default_rng(0)
    rnn = make(cell, kw, seed=1)
    model = engine_from_torch(rnn, cell, tmp_path)
    T, B = 6, 3
    x = rng.standard_normal((T, B, 7)).astype(np.float32)
    h0, c0 = rand_state(rnn, cell, B, rng)
    with torch.no_grad():
        st = (torch.from_numpy(h0), torch.from_numpy(c0)) if cell == "lstm" else torch.from_numpy(h0)
        ref, ref_state = rnn(torch.from_numpy(x), st)
    out, (h, c) = model.run(x, (h0, c0))
    assert_close(out, ref.numpy())
    if cell == "lstm":
        assert_close(h, ref_state[0].numpy())
        assert_close(c, ref_state[1].numpy())
    else:
        assert c is None
        assert_close(h, ref_state.numpy())


@pytest.mark.parametrize("cell,kw", [CASES[2], CASES[4], CASES[7], CASES[9]],
                         ids=["lstm-bi", "lstmp-bi", "gru-bi", "rnn-bi"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks-of-2-steps"])
def test_ragged_batch_equals_packed_sequence(cell, kw, chunked, tmp_path, monkeypatch):
    if chunked:  # the LSTM's input projection in chunks of 2 steps (7 steps: a short last chunk, both directions)
        monkeypatch.setattr(recurrent, "STEP_CHUNK", 2)
        monkeypatch.setattr(recurrent, "STEP_CHUNK_ROWS", 1)
    rng = np.random.default_rng(1)
    rnn = make(cell, kw, seed=2)
    model = engine_from_torch(rnn, cell, tmp_path)
    T, B = 7, 4
    lengths = np.array([7, 3, 1, 5])
    x = rng.standard_normal((T, B, 7)).astype(np.float32)
    with torch.no_grad():
        packed = nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths), enforce_sorted=False)
        ref, ref_state = rnn(packed)
        ref, _ = nn.utils.rnn.pad_packed_sequence(ref, total_length=T)
    out, (h, c) = model.run(x, lengths=lengths)
    assert_close(out, ref.numpy())
    ref_h = ref_state[0] if cell == "lstm" else ref_state
    assert_close(h, ref_h.numpy())
    if cell == "lstm":
        assert_close(c, ref_state[1].numpy())


def test_batch_first_and_threads(tmp_path):
    rng = np.random.default_rng(2)
    rnn = make("lstm", dict(num_layers=2, batch_first=True), seed=3)
    model = engine_from_torch(rnn, "lstm", tmp_path, threads=1)
    x = rng.standard_normal((5, 8, 7)).astype(np.float32)  # B, T, I
    with torch.no_grad():
        ref, _ = rnn(torch.from_numpy(x))
    out, _ = model.run(x, batch_first=True)
    assert out.shape == (5, 8, 9)
    assert_close(out, ref.numpy())
    assert model.threads == 1


def lm_modules(cell, seed, V=23, E=6, H=8, **kw):
    torch.manual_seed(seed)
    emb, rnn, head = nn.Embedding(V, E), CTORS[cell](E, H, **kw), nn.Linear(kw.get("proj_size") or H, V)
    for m in (emb, rnn, head):
        scramble(m, seed, scale=0.8)
    return emb, rnn.eval(), head


def torch_lm(emb, rnn, head, ids, state=None):
    with torch.no_grad():
        out, st = rnn(emb(torch.from_numpy(ids)), state)
        return head(out), st


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_logits_log_probs_targets(cell, tmp_path):
    emb, rnn, head = lm_modules(cell, seed=4, num_layers=2)
    model = engine_from_torch(rnn, cell, tmp_path, embedding=emb, head=head)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 23, (9, 4))
    tgt = rng.integers(0, 23, (9, 4))
    ref, ref_state = torch_lm(emb, rnn, head, ids)
    logits, _ = model.logits(ids)
    assert_close(logits, ref.numpy())
    lp, _ = model.log_probs(ids)
    ref_lp = torch.log_softmax(ref, -1).numpy()
    assert_close(lp, ref_lp)
    tlp, st = model.target_log_probs(ids, tgt)
    assert_close(tlp, np.take_along_axis(ref_lp, tgt[..., None], -1)[..., 0])
    assert_close(st[0], np_state(ref_state[0] if cell == "lstm" else ref_state))


@pytest.mark.parametrize("cell,kw", [("lstm", dict(proj_size=3)), ("lstm", dict(H=20)), ("gru", {}), ("rnn", {})])
def test_step_equals_torch(cell, kw, tmp_path):
    """Model.step runs on the compiled decoder's network (the panel layout for a plain LSTM, with H = 20 a
    padded last panel): token by token, with the state handed back each time, PyTorch's log-probs and
    state; and the same as the layers' path (_step_layers)."""
    emb, rnn, head = lm_modules(cell, seed=5, num_layers=2, **kw)
    model = engine_from_torch(rnn, cell, tmp_path, embedding=emb, head=head)
    ids = np.random.default_rng(4).integers(0, 23, (10, 3))
    ref, ref_state = torch_lm(emb, rnn, head, ids)
    ref_lp = torch.log_softmax(ref, -1).numpy()
    state = layers_state = None
    for t in range(10):
        lp, state = model.step(ids[t], state)
        assert_close(lp, ref_lp[t])
        lp2, layers_state = model._step_layers(ids[t], layers_state)
        assert_close(lp, lp2)
    assert model._decode_net[0] is not None  # the compiled path ran
    ref_state = ref_state if cell == "lstm" else (ref_state, None)
    assert_close(state[0], np_state(ref_state[0]))
    if cell == "lstm":
        assert_close(state[1], np_state(ref_state[1]))
    else:
        assert state[1] is None


@pytest.mark.parametrize("case", ["bidirectional", "head-not-vocab"])
def test_step_outside_the_compiled_network(case, tmp_path):
    """Stacks the decoder does not cover (generate refuses them) still step, through the layers: PyTorch's
    log-probs, and no compiled network built."""
    bi = case == "bidirectional"
    emb, rnn, _ = lm_modules("lstm", seed=8, num_layers=2, bidirectional=bi)
    head = nn.Linear(16 if bi else 8, 23 if bi else 26)
    scramble(head, 8, scale=0.8)
    model = engine_from_torch(rnn, "lstm", tmp_path, embedding=emb, head=head)
    ids = np.random.default_rng(6).integers(0, 23, (1, 3))
    lp, _ = model.step(ids[0])
    ref, _ = torch_lm(emb, rnn, head, ids)
    assert_close(lp, torch.log_softmax(ref[0], -1).numpy())
    assert getattr(model, "_decode_net", None) is None


def test_state_carry_equals_one_call(tmp_path):
    emb, rnn, head = lm_modules("gru", seed=6, num_layers=1)
    model = engine_from_torch(rnn, "gru", tmp_path, embedding=emb, head=head)
    ids = np.random.default_rng(5).integers(0, 23, (12, 3))
    whole, _ = model.target_log_probs(ids[:-1], ids[1:])
    a, st = model.target_log_probs(ids[:5], ids[1:6])
    b, _ = model.target_log_probs(ids[5:-1], ids[6:], state=st)
    assert_close(np.concatenate([a, b]), whole, atol=1e-5)


def test_ragged_target_log_probs_zero_past_end(tmp_path):
    emb, rnn, head = lm_modules("lstm", seed=7, num_layers=1)
    model = engine_from_torch(rnn, "lstm", tmp_path, embedding=emb, head=head)
    ids = np.random.default_rng(6).integers(0, 23, (6, 2))
    lp, _ = model.target_log_probs(ids, ids, lengths=[6, 2])
    assert np.all(lp[2:, 1] == 0) and np.all(lp[:, 0] < 0) and np.all(lp[:2, 1] < 0)
    alone, _ = model.target_log_probs(ids[:2, 1:], ids[:2, 1:])
    assert_close(lp[:2, 1], alone[:, 0])
