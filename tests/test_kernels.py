"""Every Numba kernel against its plain NumPy (float64) twin in tests/naive.py."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_infer import kernels
from lstm_infer.format import ACTIVATIONS
from tests import naive
from tests.util import assert_close

B, H = 3, 7
rng = np.random.default_rng(0)


def r(*shape, scale=1.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_rational_tanh_and_sigmoid_accuracy():
    x = np.linspace(-12, 12, 200001).astype(np.float32)
    t = np.array([kernels.ftanh(v) for v in x[::50]], np.float64)
    assert np.max(np.abs(t - np.tanh(x[::50].astype(np.float64)))) < 1e-6
    s = np.array([kernels.fsigmoid(v) for v in x[::50]], np.float64)
    assert np.max(np.abs(s - 1 / (1 + np.exp(-x[::50].astype(np.float64))))) < 1e-6


@pytest.mark.parametrize("peep,clip,input_forget", [(False, None, False), (True, 0.7, False), (True, None, True),
                                                     (False, 0.7, True)])
def test_lstm_step(peep, clip, input_forget):
    gx, gh, bias, c = r(B, 4 * H), r(B, 4 * H), r(4 * H), r(B, H)
    p = r(3, H) if peep else np.zeros((3, H), np.float32)
    ref_c, ref_y = naive.lstm_step(gx, gh, bias, p, clip, input_forget, c.astype(np.float64))
    gxT, ghT, clip32 = np.ascontiguousarray((gx + bias).T), np.ascontiguousarray(gh.T), np.float32(clip or kernels.BIG)
    valid = np.array([True, False, True])
    for step in (kernels.lstm_step_rows, kernels.lstm_step_rows_serial):  # gx, gh, c, y feature-major: (features, B)
        cc, y = np.ascontiguousarray(c.T), np.zeros((H, B), np.float32)
        step(gxT, ghT, p, clip32, input_forget, cc, y, valid)
        assert_close(cc.T[valid], ref_c[valid])
        assert_close(y.T[valid], ref_y[valid])
        assert_close(cc.T[1], c[1], atol=0)  # an invalid column keeps its state
    if not peep:  # the flat kernels serve steps without peepholes where every row is valid
        for step in (kernels.lstm_step_flat, kernels.lstm_step_flat_serial):
            cc, y = np.ascontiguousarray(c.T), np.zeros((H, B), np.float32)
            step(gxT, ghT, clip32, input_forget, cc, y)
            assert_close(cc.T, ref_c)
            assert_close(y.T, ref_y)


def test_lstm_step_flat_many_blocks():
    """More hidden units than one block, and a ragged last block: every unit lands where it belongs."""
    h, b = 2 * kernels.UNIT_BLOCK + 5, 2
    gx, gh, c = r(b, 4 * h), r(b, 4 * h), r(b, h)
    ref_c, ref_y = naive.lstm_step(gx, gh, np.zeros(4 * h, np.float32), np.zeros((3, h), np.float32), None, False,
                                   c.astype(np.float64))
    cc, y = np.ascontiguousarray(c.T), np.zeros((h, b), np.float32)
    kernels.lstm_step_flat(np.ascontiguousarray(gx.T), np.ascontiguousarray(gh.T), kernels.BIG, False, cc, y)
    assert_close(cc.T, ref_c)
    assert_close(y.T, ref_y)


def test_gather_steps():
    n, g, b = 3, 5, 4
    gxa, bias = r(g, n * b), r(g)
    out = np.zeros((n, g, b), np.float32)
    kernels.gather_steps(gxa, bias, out)
    ref = (gxa.astype(np.float64) + bias[:, None]).reshape(g, n, b).transpose(1, 0, 2)
    assert_close(out, ref)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_lstm_step_generic_activations(name):
    _, a, b = ACTIVATIONS[name]
    alpha, beta = (a * 0.9 if a else a), (b * 1.1 if b else b)
    acts = ((name, alpha, beta), ("tanh", 0, 0), (name, alpha, beta))
    gx, gh, bias, c, p = r(B, 4 * H), r(B, 4 * H), r(4 * H), r(B, H), r(3, H)
    ref_c, ref_y = naive.lstm_step(gx, gh, bias, p, 2.5, False, c.astype(np.float64), acts)
    codes = np.array([ACTIVATIONS[n][0] for n, _, _ in acts], np.int64)
    alphas = np.array([x[1] for x in acts], np.float32)
    betas = np.array([x[2] for x in acts], np.float32)
    y, work = np.zeros((B, H), np.float32), np.zeros((B, 4 * H), np.float32)
    kernels.lstm_step_generic(gx, gh, bias, p, np.float32(2.5), False, c, y, np.ones(B, np.bool_),
                              codes, alphas, betas, work)
    assert_close(c, ref_c)
    assert_close(y, ref_y)


@pytest.mark.parametrize("lbr", [False, True])
def test_gru_phases(lbr):
    gx, h, w_hh, bias, b_hn = r(B, 3 * H), r(B, H), r(3 * H, H, scale=0.5), r(3 * H), r(H)
    if not lbr:
        b_hn[:] = 0  # format v1: without linear_before_reset the recurrent n bias is folded into bias
    ref = naive.gru_step(gx, h.astype(np.float64), w_hh, bias, b_hn, lbr)
    codes, alphas, betas = np.array([0, 1]), np.zeros(2, np.float32), np.zeros(2, np.float32)
    valid = np.ones(B, np.bool_)
    gh = np.zeros((B, 3 * H), np.float32)
    rz, rh, y = np.zeros((B, 2 * H), np.float32), np.zeros((B, H), np.float32), np.zeros((B, H), np.float32)
    gh[:, : 2 * H] = h @ w_hh[: 2 * H].T
    kernels.gru_gates(gx, gh, bias, kernels.BIG, h, rz, rh, valid, codes, alphas, betas)
    ghn = (h @ w_hh[2 * H:].T) if lbr else (rh @ w_hh[2 * H:].T)
    kernels.gru_update(gx, ghn.astype(np.float32), b_hn, bias, kernels.BIG, lbr, h, rz, y, valid,
                       codes, alphas, betas)
    assert_close(y, ref)


def test_rnn_step_and_commit():
    gx, gh, bias = r(B, H), r(B, H), r(H)
    y = np.zeros((B, H), np.float32)
    valid = np.array([True, True, False])
    kernels.rnn_step(gx, gh, bias, kernels.BIG, y, valid, np.array([2]), np.zeros(1, np.float32),
                     np.zeros(1, np.float32))
    assert_close(y[:2], naive.act(gx + gh + bias, "relu")[:2])
    for commit, tr in ((kernels.commit, False), (kernels.commit_serial, False), (kernels.commit_t, True)):
        h, out = r(B, H), np.ones((B, H), np.float32)
        h1 = h.copy()
        if tr:  # feature-major state (H, B), output still (B, H)
            hT = np.ascontiguousarray(h.T)
            commit(np.ascontiguousarray(y.T), hT, out, valid)
            h = hT.T
        else:
            commit(y, h, out, valid)
        assert_close(h[:2], y[:2], atol=0)
        assert_close(h[2], h1[2], atol=0)
        assert_close(out[2], 0, atol=0)
        assert_close(out[:2], y[:2], atol=0)


def test_log_softmax_and_gather():
    x = r(9, 301, scale=6)
    ref = naive.log_softmax(x)
    tg = rng.integers(0, 301, 9)
    out = np.zeros(9, np.float32)
    kernels.gather_log_softmax(x, tg, out)
    assert_close(out, ref[np.arange(9), tg])
    y = x.copy()
    kernels.log_softmax_rows(y)
    assert_close(y, ref)
