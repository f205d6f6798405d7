"""The fused LSTM steps (lstm_infer/fused.py) and their GEMM micro-kernel (simd.py) against NumPy float64."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from numba import njit

from lstm_infer import fused, kernels, recurrent
from lstm_infer.layers import Direction, Layer, zero_state
from lstm_infer.simd import rows_gemm, rows_gemm2
from lstm_infer.workers import Workers
from tests import naive
from tests.util import assert_close

rng = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def batch1_copies_at_once(monkeypatch):
    """Batch-1 directions take their row-layout and W_ih^T copies on the first call here (recurrent.COPY_AFTER),
    so that the short sequences of these tests run those paths; test_batch1_copies_wait checks the wait."""
    monkeypatch.setattr(recurrent, "COPY_AFTER", 0)


def u(*shape, scale=1.0):
    return rng.uniform(-scale, scale, shape).astype(np.float32)


@njit(cache=True)
def _rows_gemm(w, r0, r1, h, out, o0, wide):
    rows_gemm(w, r0, r1, h, out, o0, wide)


@pytest.mark.parametrize("K", [1, 7, 64, 513])
@pytest.mark.parametrize("N", [16, 32, 48, 64, 80, 144])
def test_rows_gemm(K, N):
    """Every tile shape (1-4 vectors of columns, and a ragged column tail), rows with a re-run tail."""
    M = 40
    w, h = u(M, K), u(K, N)
    ref = w.astype(np.float64) @ h
    for (r0, r1, o0), wide in itertools.product(((0, M, 0), (3, 16, 0), (5, 34, 2), (8, 16, 30)), (False, True)):
        out = np.full((M + 2, N), np.nan, np.float32)
        _rows_gemm(w, r0, r1, h, out, o0, wide)
        assert_close(out[o0:o0 + r1 - r0], ref[r0:r1], atol=1e-5 * K)
        assert np.isnan(out[:o0]).all() and np.isnan(out[o0 + r1 - r0:]).all()  # nothing outside the rows


@njit(cache=True)
def _rows_gemm2(w, h, w2, h2, r0, r1, out, o0):
    rows_gemm2(w, h, w2, h2, r0, r1, out, o0)


@pytest.mark.parametrize("K,K2", [(1, 7), (64, 0), (0, 64), (130, 513)])
@pytest.mark.parametrize("N", [16, 32, 48, 64, 80])
def test_rows_gemm2(K, K2, N):
    """Two products summed in one tile, including an empty one and a re-run row tail."""
    M = 40
    w, h, w2, h2 = u(M, K), u(K, N), u(M, K2), u(K2, N)
    ref = w.astype(np.float64) @ h + w2.astype(np.float64) @ h2
    for r0, r1, o0 in ((0, M, 0), (3, 16, 0), (5, 34, 2), (8, 16, 30)):
        out = np.full((M + 2, N), np.nan, np.float32)
        _rows_gemm2(w, h, w2, h2, r0, r1, out, o0)
        assert_close(out[o0:o0 + r1 - r0], ref[r0:r1], atol=1e-5 * (K + K2 + 1))
        assert np.isnan(out[:o0]).all() and np.isnan(out[o0 + r1 - r0:]).all()


def reference(x, w_ih, w_hh, bias, peep, clip, input_forget, valid, reverse, h, c):
    """The whole sequence, one naive step at a time; rows past their length keep h, c and emit zeros."""
    T, B, _ = x.shape
    H = w_hh.shape[1]
    h, c = h.astype(np.float64), c.astype(np.float64)
    out = np.zeros((T, B, H))
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        cn, y = naive.lstm_step(x[t] @ w_ih.T.astype(np.float64), h @ w_hh.T.astype(np.float64), bias, peep, clip,
                                input_forget, c)
        v = valid[t][:, None]
        h, c = np.where(v, y, h), np.where(v, cn, c)
        out[t] = np.where(v, y, 0)
    return out, h, c


CASES = [  # B, H, peepholes, clip, input_forget, ragged, reverse
    (1, 37, False, None, False, False, False),  # dot layout, serial
    (3, 8, True, 0.8, False, True, False),
    (8, 37, False, None, True, False, True),
    (9, 8, False, None, False, False, False),  # panel layout from here: 16 columns, 7 of them padding
    (9, 37, True, None, False, True, True),
    (17, 40, False, 0.6, False, False, False),
    (32, 64, False, None, False, False, False),  # no padding
    (33, 19, True, 0.9, True, True, False),
    (70, 24, False, None, False, True, True),  # 80 columns: one 4-vector and one 1-vector tile
    (12, 5, False, None, False, False, False),  # H < 8: the dot layout even for a wide batch
    # chunks big enough for a gang of threads (fused.members), which share each step's blocks of units;
    # a batch of one takes the row layout (fused.lstm_steps_row), also on a gang of one
    (1, 320, False, None, False, False, False),
    (1, 330, True, 0.8, True, True, True),  # 21 panels, the last with 10 units
    (1, 40, True, 0.7, False, True, True),
    (5, 140, True, 0.7, False, True, True),
    (20, 100, True, None, False, True, True),
    # steps big enough to split, chunks too short for a gang: a parallel region per step
    (2, 200, True, 0.7, False, True, False),
    (16, 70, False, None, True, True, True),
]


@pytest.mark.parametrize("B,H,peep,clip,input_forget,ragged,reverse", CASES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_lstm_direction(B, H, peep, clip, input_forget, ragged, reverse, threads):
    _check_direction(B, H, peep, clip, input_forget, ragged, reverse, threads)


def test_fused_panel_blocks_own_their_rows():
    """Panel blocks of at least 8 units: H = 19 in blocks of 8 and 11 (a 3-unit tail block would re-run a
    tile over its neighbour's rows while another thread applies that block's gates), H = 100 in eight
    blocks of 11 and one of 12, on 2 and 3 threads. Repeated: a race shows only now and then."""
    assert fused.blocks(19, 8, True) == 2 and fused.blocks(100, 11, True) == 9
    assert fused.members(2, 37, 200, 19, True) == 2 and fused.members(3, 11, 33, 100, True) == 3
    for _ in range(10):
        _check_direction(200, 19, True, 0.9, True, True, False, 2)
        _check_direction(33, 100, True, 0.9, True, True, False, 3)


def test_gang_members_and_blocks():
    assert fused.members(4, 100, 1, 37, False) == 1  # too small to split
    assert fused.members(1, 100, 1, 512, False) == 1
    assert fused.members(4, 1, 1, 512, False) == 0  # one batch-1 step: a parallel region, not a gang
    assert fused.members(4, 4, 1, 512, False) == 4
    assert fused.unit_block(32, 50) == 13 and fused.members(8, 16, 32, 50, True) == 3  # no more than blocks
    assert fused.blocks(50, 8, True) == 6 and fused.blocks(10, 3, False) == 4


def _check_direction(B, H, peep, clip, input_forget, ragged, reverse, threads):
    T, I = (37 if B >= 64 else 11), 6  # B = 70: steps in chunks of 16, 16 and 5 (an odd last chunk)
    x, w_ih, w_hh, bias = u(T, B, I), u(4 * H, I, scale=0.8), u(4 * H, H, scale=1.5 / np.sqrt(H)), u(4 * H, scale=0.6)
    p = u(3, H) if peep else np.zeros((3, H), np.float32)
    lengths = rng.integers(0, T + 1, B) if ragged else np.full(B, T)
    valid = np.arange(T)[:, None] < lengths[None, :]
    h0, c0 = u(B, H), u(B, H)
    dw = Direction(w_ih=w_ih, w_hh=w_hh, bias=bias, b_hn=None, peep=p, w_hr=None,
                             codes=np.array([0, 1, 1]), alphas=np.zeros(3, np.float32),
                             betas=np.zeros(3, np.float32), standard=True, reverse=reverse)
    ly = Layer(cell="lstm", input_size=I, hidden=H, out=H,
                         clip=np.float32(clip) if clip else kernels.BIG, input_forget=input_forget, lbr=False,
                         dirs=[dw])
    h, c = h0.copy(), c0.copy()
    out = recurrent.run_lstm_t(ly, dw, x, h, c, valid, Workers(threads))
    assert (dw.w_hh_p is not None) == (B == 1 and fused.members(threads, T, B, H, False) > 0)  # the row layout ran
    ref_out, ref_h, ref_c = reference(x, w_ih, w_hh, bias, p, clip, input_forget, valid, reverse, h0, c0)
    assert_close(out, ref_out)
    assert_close(h, ref_h)
    assert_close(c, ref_c)


def _direction(I, H, peep, clip, input_forget, reverse=False):
    w_ih, w_hh, bias = u(4 * H, I, scale=0.8), u(4 * H, H, scale=1.5 / np.sqrt(H)), u(4 * H, scale=0.6)
    p = u(3, H) if peep else np.zeros((3, H), np.float32)
    dw = Direction(w_ih=w_ih, w_hh=w_hh, bias=bias, b_hn=None, peep=p, w_hr=None,
                             codes=np.array([0, 1, 1]), alphas=np.zeros(3, np.float32),
                             betas=np.zeros(3, np.float32), standard=True, reverse=reverse)
    return Layer(cell="lstm", input_size=I, hidden=H, out=H,
                           clip=np.float32(clip) if clip else kernels.BIG, input_forget=input_forget, lbr=False,
                           dirs=[dw])


@pytest.mark.parametrize("B,sizes,T,ragged", [
    (9, (24, 40, 19), 11, True),  # 7 padding columns, three layer sizes, a 3-unit tail block
    (32, (64, 64), 40, False),  # two chunks of 32 and 8 steps
    (20, (128, 96), 24, True),  # chunks long enough for a gang
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_stack_folds_input_projection(B, sizes, T, ragged, threads, monkeypatch):
    """Plain LSTM layers in the panel layout pass their output feature-major and the next layer computes
    W_ih x_t inside its steps: the stack = the layers run one by one in float64, and only layer 0 runs an
    input-projection GEMM."""
    I = 6
    layers, k = [], I
    for i, H in enumerate(sizes):
        layers.append(_direction(k, H, peep=i == 1, clip=0.9 if i == 2 else None, input_forget=False,
                                 reverse=i == 2))
        k = H
    x = u(T, B, I)
    lengths = rng.integers(0, T + 1, B) if ragged else np.full(B, T)
    valid = np.arange(T)[:, None] < lengths[None, :]
    state = zero_state(layers, B)
    for h, c in state:
        h[...], c[...] = u(*h.shape), u(*c.shape)
    init = [(h.copy(), c.copy()) for h, c in state]
    calls = []
    real = recurrent._input_projection
    monkeypatch.setattr(recurrent, "_input_projection", lambda *a: calls.append(1) or real(*a))
    out = recurrent.run_stack(layers, x, state, valid, Workers(threads))
    assert len(calls) == -(-T // max(recurrent.STEP_CHUNK, -(-recurrent.STEP_CHUNK_ROWS // B)))  # layer 0's
    ref = x
    for ly, (h0, c0), (h, c) in zip(layers, init, state):
        dw = ly.dirs[0]
        ref, rh, rc = reference(ref, dw.w_ih, dw.w_hh, dw.bias, dw.peep, None if ly.clip == kernels.BIG else ly.clip,
                                ly.input_forget, valid, dw.reverse, h0, c0)
        assert_close(h, rh)
        assert_close(c, rc)
    assert out.shape == (T, B, sizes[-1])
    assert_close(out, ref)


@pytest.mark.parametrize("n,I,G", [(8, 7, 16), (45, 64, 48), (100, 130, 1280)])
def test_project_rows(n, I, G):
    """A batch-1 chunk's input projection through the panel tiles (a ragged row tail, split in two parts
    as two threads would take it) against float64."""
    x, w, b = u(n, I), u(G, I), u(G)
    out = np.full((n, G), np.nan, np.float32)
    h = n // 2 if n >= 16 else n
    fused.project_rows(x, 0, h, np.ascontiguousarray(w.T), b, out)
    if h < n:
        fused.project_rows(x, h, n, np.ascontiguousarray(w.T), b, out)
    assert_close(out, x.astype(np.float64) @ w.T + b, atol=1e-5 * I)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch1_projection_path(threads, monkeypatch):
    """A batch-1 direction long enough for fused.project_rows (G = 4H a multiple of 16) = the reference, and
    the projection really took that path."""
    calls = []
    real = fused.project_rows
    monkeypatch.setattr(fused, "project_rows", lambda *a: calls.append(1) or real(*a))
    T, I, H = 70, 24, 36
    ly = _direction(I, H, peep=False, clip=None, input_forget=False)
    dw = ly.dirs[0]
    x = u(T, 1, I)
    valid = np.ones((T, 1), bool)
    h0, c0 = u(1, H), u(1, H)
    h, c = h0.copy(), c0.copy()
    out = recurrent.run_lstm_t(ly, dw, x, h, c, valid, Workers(threads))
    ref_out, ref_h, ref_c = reference(x, dw.w_ih, dw.w_hh, dw.bias, dw.peep, None, False, valid, False, h0, c0)
    assert calls
    assert_close(out, ref_out)
    assert_close(h, ref_h)
    assert_close(c, ref_c)


def test_gather_table():
    table, ids = u(30, 12), rng.integers(0, 30, (5, 9))
    for kernel, t in ((kernels.gather_table, table), (kernels.gather_table_columns, np.ascontiguousarray(table.T))):
        out = np.full((5, 12, 16), 7.0, np.float32)
        kernel(t, ids, out)
        np.testing.assert_array_equal(out[:, :, :9], table[ids].transpose(0, 2, 1))
        assert (out[:, :, 9:] == 7.0).all()  # padding columns untouched


@pytest.mark.parametrize("B", [1, 3, 20])
@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("H", [24, 128])
def test_token_table_path_matches_torch(B, columns, H, tmp_path, monkeypatch):
    """Scoring through layer 0's token table (row, dot and panel layouts, either table orientation) = PyTorch
    = the embedding + GEMM path; the table computes the rows of the tokens it is asked for. H = 128: a gang
    of 2 whose members gather their own units' rows; B = 1: the row layout, on a gang of 2 (CASES has a gang of 1)."""
    torch = pytest.importorskip("torch")
    from tests.util import engine_from_torch, scramble

    torch.manual_seed(0)
    V, E = 40, 6
    emb, rnn, head = torch.nn.Embedding(V, E), torch.nn.LSTM(E, H, 2), torch.nn.Linear(H, V)
    for m in (emb, rnn, head):
        scramble(m, 3, scale=0.8)
    monkeypatch.setattr(recurrent, "TABLE_COLUMNS_V", V if columns else V - 1)
    monkeypatch.setattr(recurrent, "COPY_AFTER", 0)  # a batch of one takes the row layout at once,
    if B == 1:  # on a gang even for these few steps
        monkeypatch.setattr(fused, "members", lambda threads, n, B, H, panel: threads)
    model = engine_from_torch(rnn.eval(), "lstm", tmp_path, embedding=emb, head=head, threads=2)
    # H = 128: chunks long enough for a gang (fused.members), short enough that this chaotic (scrambled)
    # model's float32 rounding does not grow past the tolerance
    T = 13 if H == 24 else (24 if B == 3 else 8)
    ids, tgt = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    with torch.no_grad():
        ref = torch.log_softmax(head(rnn(emb(torch.from_numpy(ids)))[0]), -1).numpy()
    ref = np.take_along_axis(ref, tgt[..., None], -1)[..., 0]
    first, _ = model.target_log_probs(ids[:, :1], tgt[:, :1])  # the table holds the rows of these tokens only
    assert model._table is not None and (model._table.cols is not None) == columns
    assert set(np.flatnonzero(model._table.have)) == set(ids[:, 0])
    assert_close(first, ref[:, :1])
    lp, _ = model.target_log_probs(ids, tgt)  # the other tokens' rows join
    assert set(np.flatnonzero(model._table.have)) == set(ids.ravel())
    assert_close(lp, ref)
    monkeypatch.setattr(recurrent, "TABLE_BYTES", 0)
    plain = engine_from_torch(rnn.eval(), "lstm", tmp_path / "plain", embedding=emb, head=head, threads=2)
    lp2, _ = plain.target_log_probs(ids, tgt)
    assert plain._table is None
    assert_close(lp2, lp, atol=1e-6)


def test_project_tokens():
    """Token table rows = emb @ W_ih^T + bias in float64, for the new ids only (13 of them: groups of 6 and a
    tail; one twice, one already there), the transposed copy too; the same floats however the rows group."""
    V, E, G = 30, 7, 76  # G: one 64-column strip and a 12-column tail
    emb, w_ih, bias = u(V, E), u(G, E), u(G)
    w_t = fused.tokens_weights(w_ih)
    assert w_t.shape == (E, 128) and not w_t[:, G:].any()
    rows, cols, have = np.zeros((V, G), np.float32), np.zeros((G, V), np.float32), np.zeros(V, bool)
    rows[4], have[4] = 9.0, True  # there already: left alone
    ids = np.array([3, 4, 7, 3, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], np.int64)
    fused.project_tokens(emb, w_t, bias, ids, rows, cols, have)
    new = sorted(set(ids) - {4})
    assert set(np.flatnonzero(have)) == set(new) | {4}
    assert_close(rows[new], emb[new].astype(np.float64) @ w_ih.T.astype(np.float64) + bias, atol=1e-6)
    assert (rows[4] == 9.0).all() and not np.delete(rows, new + [4], axis=0).any()
    np.testing.assert_array_equal(cols[:, new], rows[new].T)
    one = np.zeros((V, G), np.float32)  # a row at a time, as the decoder fills them: bitwise the same
    for v in new:
        fused.project_tokens(emb, w_t, bias, np.array([v]), one, np.empty((0, 0), np.float32), np.zeros(V, bool))
    np.testing.assert_array_equal(one[new], rows[new])


def test_workers_buffers_reuse_storage(monkeypatch):
    """One storage per name and thread, whatever the shape (no new pages when a batch size changes), grown
    when a call needs more; scratch() declines past SCRATCH_BYTES so a huge call leaves nothing held."""
    from lstm_infer import workers

    wk = Workers(1)
    a = wk.buffer("x", 4, (3, 5))
    a[...] = 1.0
    b = wk.buffer("x", 2, (7,))
    assert np.shares_memory(a, b) and b.shape == (2, 7) and (b == 1.0).all()
    c = wk.buffer("x", 10, (10,))  # more than there was: new, zeroed storage
    assert not np.shares_memory(a, c) and not c.any()
    assert np.shares_memory(wk.scratch("x", (5, 4)), c)
    monkeypatch.setattr(workers, "SCRATCH_BYTES", 4 * 99)
    assert wk.scratch("x", (10, 10)) is None and wk.scratch("x", (9, 11)).shape == (9, 11)


def test_scratch_outputs_stay_inside_a_call(tmp_path):
    """Scoring keeps the layers' outputs in reused buffers (run_stack's keep_last): what Model.run returned
    stays as it was through later calls of either kind, and the same call twice gives the same numbers."""
    torch = pytest.importorskip("torch")
    from tests.util import engine_from_torch, scramble

    torch.manual_seed(1)
    V, E, H, B, T = 30, 6, 24, 12, 9  # B >= 9: the panel layout, outputs feature-major between layers;
    # run() on 4 rows: the dot layout, every layer's output (T, 4, H), so that buffers would be reused
    emb, rnn, head = torch.nn.Embedding(V, E), torch.nn.LSTM(E, H, 3), torch.nn.Linear(H, V)
    for m in (emb, rnn, head):
        scramble(m, 3, scale=0.5)
    model = engine_from_torch(rnn.eval(), "lstm", tmp_path, embedding=emb, head=head, threads=2)
    xs = [np.asarray(emb.weight.detach())[rng.integers(0, V, (T, 4))] for _ in range(2)]
    ids, tgt = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    out, _ = model.run(xs[0])
    kept = out.copy()
    model.run(xs[1])
    lp, _ = model.target_log_probs(ids, tgt)
    lp2, _ = model.target_log_probs(ids[:, :10], tgt[:, :10])
    np.testing.assert_array_equal(out, kept)
    np.testing.assert_array_equal(lp2, model.target_log_probs(ids[:, :10], tgt[:, :10])[0])
    np.testing.assert_array_equal(lp, model.target_log_probs(ids, tgt)[0])
    with torch.no_grad():
        ref = torch.log_softmax(head(rnn(emb(torch.from_numpy(ids)))[0]), -1).numpy()
    assert_close(lp, np.take_along_axis(ref, tgt[..., None], -1)[..., 0])


@pytest.mark.parametrize("N,K,F", [(1, 8, 5), (70, 300, 33), (128, 9, 64)])
def test_target_log_probs_panel(N, K, F):
    """The head's panel kernel (tokens in tiles of 64, a ragged last tile) against a float64 log-softmax."""
    from lstm_infer import head

    feats, w, b = u(N, F), u(K, F, scale=2.0), u(K)
    targets = rng.integers(0, K, N)
    out = np.empty(N, np.float32)
    head.target_log_probs_panel(feats, w, b, targets, out)
    ref = naive.log_softmax(feats.astype(np.float64) @ w.T + b)[np.arange(N), targets]
    assert_close(out, ref)


@pytest.mark.parametrize("T,B,K,F", [(1, 9, 8, 5), (6, 33, 300, 40)])
def test_target_log_probs_fm(T, B, K, F):
    """The feature-major head (a time step per task, columns past B padding) against a float64 log-softmax."""
    from lstm_infer import head

    N = -(-B // 16) * 16
    feats = u(T, F, N)
    feats[:, :, B:] = 50.0  # padding columns: finite junk that must not reach the real columns
    w, b = u(K, F, scale=2.0), u(K)
    targets = rng.integers(0, K, (T, B))
    out = head.target_log_probs_fm(feats, B, w, b, targets)
    ref = naive.log_softmax(feats[:, :, :B].transpose(0, 2, 1).astype(np.float64) @ w.T + b)
    assert_close(out, np.take_along_axis(ref, targets[..., None], -1)[..., 0])
    out0 = head.target_log_probs_fm(feats, B, w, None, targets)
    ref0 = naive.log_softmax(feats[:, :, :B].transpose(0, 2, 1).astype(np.float64) @ w.T)
    assert_close(out0, np.take_along_axis(ref0, targets[..., None], -1)[..., 0])


@pytest.mark.parametrize("lengths", [None, [8, 3, 0, 8, 5, 8, 8, 1, 8, 2, 8, 8]])
def test_model_scores_through_fm_head(lengths, tmp_path, monkeypatch):
    """A batch in the panel layout with a small head: the last layer hands its output feature-major to the
    head (head.target_log_probs_fm ran), with the same log-probs as the batch-major path."""
    pytest.importorskip("torch")
    from lstm_infer import head
    from tests.test_engine_torch import lm_modules
    from tests.util import engine_from_torch

    emb, rnn, hd = lm_modules("lstm", 3, V=21, E=6, H=24, num_layers=2)
    model = engine_from_torch(rnn, "lstm", tmp_path, embedding=emb, head=hd, threads=2)
    ids, tgt = rng.integers(0, 21, (8, 12)), rng.integers(0, 21, (8, 12))
    calls = []
    real = head._target_log_probs_fm
    monkeypatch.setattr(head, "_target_log_probs_fm", lambda *a: calls.append(1) or real(*a))
    fm, _ = model.target_log_probs(ids, tgt, lengths=lengths)
    assert calls
    monkeypatch.setattr(head, "FM_HEAD_BYTES", 0)
    plain, _ = model.target_log_probs(ids, tgt, lengths=lengths)
    assert len(calls) == 1
    assert_close(fm, plain, atol=1e-6)
    if lengths is not None:
        assert (fm[np.arange(8)[:, None] >= np.array(lengths)[None, :]] == 0).all()


def test_batch1_copies_wait(monkeypatch):
    """A batch-1 direction makes its copies of W_hh (row layout) and W_ih^T only once it has run COPY_AFTER
    steps: a one-line score does not pay for them. Before and after, the same numbers as the reference."""
    monkeypatch.setattr(recurrent, "COPY_AFTER", 100)
    T, I, H = 64, 24, 36  # 4H a multiple of 16 and T >= PROJECT_MIN_ROWS: project_rows once the copy is there
    ly = _direction(I, H, peep=False, clip=None, input_forget=False)
    dw = ly.dirs[0]
    valid = np.ones((T, 1), bool)
    for call in range(2):
        x, h0, c0 = u(T, 1, I), u(1, H), u(1, H)
        h, c = h0.copy(), c0.copy()
        out = recurrent.run_lstm_t(ly, dw, x, h, c, valid, Workers(2))
        assert (dw.w_hh_p is not None, dw.w_ih_t is not None) == ((False, False) if call == 0 else (True, True))
        ref_out, ref_h, ref_c = reference(x, dw.w_ih, dw.w_hh, dw.bias, dw.peep, None, False, valid, False, h0, c0)
        assert_close(out, ref_out)
        assert_close(h, ref_h)
