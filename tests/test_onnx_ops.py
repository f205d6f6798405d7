"""Single-node ONNX LSTM / GRU / RNN graphs: converted and run by the engine, matched to onnxruntime.

ONNX's Y is (T, D, B, H) and Y_h / Y_c (D, B, H); the engine's run() gives (T, B, D*H) and (D, B, H).
onnxruntime has no layout=1, so that case is matched to onnx.reference and to onnxruntime on the
transposed twin graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.onnx import load_onnx
from lstm_infer import LstmInferError, load, recurrent
from lstm_infer import format as fmt
from tests.util import assert_close

ort = pytest.importorskip("onnxruntime")

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# (alpha, beta) used for activations that take them, all away from the defaults.
ARGS = {"HardSigmoid": (0.3, 0.45), "LeakyRelu": (0.2, None), "ThresholdedRelu": (0.15, None),
        "ScaledTanh": (0.9, 1.3), "Affine": (0.7, 0.1), "Elu": (0.6, None)}
ACTIVATIONS = ["Sigmoid", "Tanh", "Relu", "HardSigmoid", "LeakyRelu", "ThresholdedRelu", "ScaledTanh", "Affine",
               "Elu", "Softsign", "Softplus"]


def engine_from_onnx(path, tmp_path, name="model"):
    """load_onnx -> write_model -> load: the path every ONNX file takes to the engine."""
    config, tensors, vocab = load_onnx(path)
    return load(fmt.write_model(tmp_path / name, config, tensors, vocab))


def act_attrs(names: list[str]) -> dict:
    """activations + alpha/beta lists, consumed in order by the activations that take them (onnxruntime's rule)."""
    alphas = [ARGS[n][0] for n in names if n in ARGS]
    betas = [ARGS[n][1] for n in names if n in ARGS and ARGS[n][1] is not None]
    out = {"activations": names}
    if alphas:
        out["activation_alpha"] = alphas
    if betas:
        out["activation_beta"] = betas
    return out


def node_model(op, I=5, H=4, *, direction="forward", layout=0, bias=True, peep=False, lens=False, state=True,
               seed=0, scale=0.8, attrs=None, wtype=np.float32, opset=14):
    """A one-node graph with random initializers; returns (model, weights)."""
    rng = np.random.default_rng(seed)
    G, D = GATES[op], 2 if direction == "bidirectional" else 1
    u = lambda *shape: rng.uniform(-scale, scale, shape).astype(wtype)
    w = {"W": u(D, G * H, I), "R": u(D, G * H, H)}
    if bias:
        w["B"] = u(D, 2 * G * H)
    if peep:
        w["P"] = u(D, 3 * H)
    xt = helper.np_dtype_to_tensor_dtype(np.dtype(wtype))
    tb = ["B", "T"] if layout else ["T", "B"]
    inputs = [helper.make_tensor_value_info("X", xt, [*tb, I])]
    if lens:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["B"]))
    sb = ["B", D] if layout else [D, "B"]
    states = ["h0", "c0"][: 2 if op == "LSTM" else 1] if state else []
    inputs += [helper.make_tensor_value_info(s, xt, [*sb, H]) for s in states]
    ins = ["X", "W", "R", "B" if bias else "", "lens" if lens else "", "h0" if state else ""]
    if op == "LSTM":
        ins += ["c0" if state else "", "P" if peep else ""]
    outs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    node = helper.make_node(op, ins, outs, name="rec", hidden_size=H, direction=direction,
                            **({"layout": layout} if layout else {}), **(attrs or {}))
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(o, xt, None) for o in outs],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, w


def run_ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def feeds_for(op, T, B, I, H, D, *, lens=None, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    f = {"X": rng.standard_normal((T, B, I)).astype(dtype), "h0": rng.standard_normal((D, B, H)).astype(dtype)}
    if op == "LSTM":
        f["c0"] = rng.standard_normal((D, B, H)).astype(dtype)
    if lens is not None:
        f["lens"] = np.asarray(lens, np.int32)
    return f


def check(model, tmp_path, op, *, T=6, B=3, I=5, H=4, lens=None, state=True, atol=2e-5):
    """Convert ``model``, run both sides on the same random inputs, compare Y, Y_h, Y_c."""
    D = 2 if any(a.s == b"bidirectional" for a in model.graph.node[-1].attribute) else 1
    f = feeds_for(op, T, B, I, H, D, lens=lens)
    ref = run_ort(model, f)
    onnx.save(model, tmp_path / "node.onnx")
    eng = engine_from_onnx(tmp_path / "node.onnx", tmp_path)
    st = (f["h0"], f.get("c0")) if state else None
    out, (h, c) = eng.run(f["X"], st, lengths=lens)
    assert_close(out, ref[0].transpose(0, 2, 1, 3).reshape(T, B, D * H), atol=atol)
    assert_close(h, ref[1], atol=atol)
    if op == "LSTM":
        assert_close(c, ref[2], atol=atol)
    else:
        assert c is None
    return eng


LSTM_CASES = [
    dict(direction="forward", peep=True),
    dict(direction="reverse", peep=True, lens=[6, 2, 4]),
    dict(direction="bidirectional", peep=True, lens=[3, 6, 1], attrs={"clip": 0.7}),
    dict(direction="forward", attrs={"input_forget": 1, "clip": 1.1}),
    dict(direction="bidirectional", bias=False, state=False, attrs={"input_forget": 1}),
    dict(direction="reverse", lens=[1, 6, 5], attrs={"clip": 0.4}),
]


@pytest.mark.parametrize("case", LSTM_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_lstm_options(case, tmp_path):
    case = dict(case)
    lens = case.pop("lens", None)
    model, _ = node_model("LSTM", lens=lens is not None, **case)
    eng = check(model, tmp_path, "LSTM", lens=lens, state=case.get("state", True))
    layer = eng.config["layers"][0]
    assert layer["peepholes"] == case.get("peep", False)
    assert layer["input_forget"] == bool(case.get("attrs", {}).get("input_forget", 0))
    assert eng.config["provenance"].get("sequence_lens") == ("lens" if lens else None)


def test_lstm_peepholes_clip_ragged_in_chunks(tmp_path, monkeypatch):
    """Peepholes, clip and ragged rows (the "rows" gate kernel) with the input projection in 2-step chunks."""
    monkeypatch.setattr(recurrent, "STEP_CHUNK", 2)
    monkeypatch.setattr(recurrent, "STEP_CHUNK_ROWS", 1)
    case = dict(LSTM_CASES[2])
    lens = case.pop("lens")
    model, _ = node_model("LSTM", lens=True, **case)
    check(model, tmp_path, "LSTM", lens=lens)


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_gru_linear_before_reset(lbr, direction, tmp_path):
    lens = [5, 6, 2] if direction == "bidirectional" else None
    model, _ = node_model("GRU", direction=direction, lens=lens is not None, attrs={"linear_before_reset": lbr},
                          seed=2)
    eng = check(model, tmp_path, "GRU", lens=lens)
    assert eng.config["layers"][0]["linear_before_reset"] == bool(lbr)


@pytest.mark.parametrize("act", ["Tanh", "Relu"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_rnn(act, direction, tmp_path):
    D = 2 if direction == "bidirectional" else 1
    model, _ = node_model("RNN", direction=direction, lens=True, attrs={"activations": [act] * D}, seed=3,
                          scale=0.5)
    check(model, tmp_path, "RNN", lens=[4, 6, 1])


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_every_activation_in_every_role(op, act, tmp_path):
    n = {"LSTM": 3, "GRU": 2, "RNN": 1}[op]
    model, _ = node_model(op, attrs=act_attrs([act] * n), seed=4, scale=0.5)
    eng = check(model, tmp_path, op, T=4)
    got = eng.config["layers"][0]["activations"][0]
    assert [a["name"] for a in got] == [act.lower()] * n
    if act in ARGS:
        assert got[0]["alpha"] == pytest.approx(ARGS[act][0])


def test_alpha_beta_consumed_across_directions(tmp_path):
    """Bidirectional: 6 activations, alpha/beta lists shared in order by those that take them."""
    names = ["HardSigmoid", "Tanh", "ScaledTanh", "Sigmoid", "Affine", "LeakyRelu"]
    attrs = {"activations": names, "activation_alpha": [0.25, 0.8, 0.6, 0.05],
             "activation_beta": [0.4, 1.2, -0.1], "clip": 2.5}
    model, _ = node_model("LSTM", direction="bidirectional", peep=True, attrs=attrs, seed=5, scale=0.5)
    eng = check(model, tmp_path, "LSTM")
    fw, bw = eng.config["layers"][0]["activations"]
    assert (fw[0]["alpha"], fw[0]["beta"], fw[2]["alpha"], fw[2]["beta"]) == pytest.approx((0.25, 0.4, 0.8, 1.2))
    assert (bw[1]["alpha"], bw[1]["beta"], bw[2]["alpha"]) == pytest.approx((0.6, -0.1, 0.05))


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_layout_1(op, tmp_path):
    """layout=1 (batch-major X, Y, states): engine with batch_first vs onnx.reference and the layout=0 twin."""
    from onnx.reference import ReferenceEvaluator

    T, B, I, H, D = 5, 3, 5, 4, 2
    attrs = {"linear_before_reset": 1} if op == "GRU" else None
    model, _ = node_model(op, direction="bidirectional", layout=1, attrs=attrs, seed=6)
    twin, _ = node_model(op, direction="bidirectional", layout=0, attrs=attrs, seed=6)
    f = feeds_for(op, T, B, I, H, D, seed=7)
    ref = run_ort(twin, f)  # (T, D, B, H), (D, B, H)
    bf = {"X": f["X"].transpose(1, 0, 2), **{k: f[k].transpose(1, 0, 2) for k in ("h0", "c0") if k in f}}
    ref1 = ReferenceEvaluator(model).run(None, bf)  # (B, T, D, H), (B, D, H)
    assert_close(ref1[0], ref[0].transpose(2, 0, 1, 3), atol=1e-4)
    onnx.save(model, tmp_path / "l1.onnx")
    eng = engine_from_onnx(tmp_path / "l1.onnx", tmp_path)
    prov = eng.config["provenance"]
    assert prov["layouts"] == [1] and prov["batch_first"] and prov["output_axes"] == ["B", "T", "D", "H"]
    out, (h, c) = eng.run(bf["X"], (f["h0"], f.get("c0")), batch_first=True)
    assert_close(out, ref1[0].reshape(B, T, D * H))
    assert_close(h, ref1[1].transpose(1, 0, 2))
    if op == "LSTM":
        assert_close(c, ref1[2].transpose(1, 0, 2))


def with_constant_state(value: float):
    """A forward LSTM whose initial_h / initial_c are initializers (static batch 3) holding ``value``."""
    model, _ = node_model("LSTM", state=False, seed=8)
    g = model.graph
    for name in ("h0", "c0"):
        g.initializer.append(numpy_helper.from_array(np.full((1, 3, 4), value, np.float32), name))
    g.node[0].input[5], g.node[0].input[6] = "h0", "c0"
    return model


def test_constant_zero_initial_state_is_dropped(tmp_path):
    model = with_constant_state(0.0)
    f = feeds_for("LSTM", 6, 3, 5, 4, 1)
    ref = run_ort(model, f)
    onnx.save(model, tmp_path / "z.onnx")
    eng = engine_from_onnx(tmp_path / "z.onnx", tmp_path)
    out, (h, c) = eng.run(f["X"])
    assert_close(out, ref[0][:, 0])
    assert_close(c, ref[2])
    bigger, _ = eng.run(np.ones((2, 7, 5), np.float32))  # the static batch of 3 does not limit the model
    assert bigger.shape == (2, 7, 4)


def test_constant_nonzero_initial_state_is_refused(tmp_path):
    onnx.save(with_constant_state(0.5), tmp_path / "nz.onnx")
    with pytest.raises(LstmInferError, match=r"node 'rec' \(LSTM\): constant non-zero initial state") as err:
        load_onnx(tmp_path / "nz.onnx")
    assert "nz.onnx" in str(err.value) and "\n" not in str(err.value)


def test_weight_storage_float_data_fp16_double(tmp_path):
    """float_data, fp16 initializers behind a Cast, and a whole double graph all give the float32 numbers."""
    model, w = node_model("LSTM", direction="bidirectional", peep=True, seed=9)
    f = feeds_for("LSTM", 6, 3, 5, 4, 2)
    g = model.graph
    # W as float_data (the typed field), R as fp16 + Cast, B and P unchanged (raw_data).
    del g.initializer[:2]
    g.initializer.append(helper.make_tensor("W", TensorProto.FLOAT, w["W"].shape, w["W"].reshape(-1).tolist()))
    g.initializer.append(numpy_helper.from_array(w["R"].astype(np.float16), "R16"))
    g.node.insert(0, helper.make_node("Cast", ["R16"], ["R"], name="cast_r", to=TensorProto.FLOAT))
    twin, _ = node_model("LSTM", direction="bidirectional", peep=True, seed=9)
    twin.graph.initializer[1].CopyFrom(numpy_helper.from_array(w["R"].astype(np.float16).astype(np.float32), "R"))
    ref = run_ort(twin, f)
    onnx.save(model, tmp_path / "mixed.onnx")
    eng = engine_from_onnx(tmp_path / "mixed.onnx", tmp_path, "mixed")
    out, (h, c) = eng.run(f["X"], (f["h0"], f["c0"]))
    assert_close(out, ref[0].transpose(0, 2, 1, 3).reshape(6, 3, 8))
    assert_close(h, ref[1])

    dbl, _ = node_model("LSTM", direction="bidirectional", peep=True, seed=9, wtype=np.float64)
    ref = run_ort(node_model("LSTM", direction="bidirectional", peep=True, seed=9)[0], f)
    onnx.save(dbl, tmp_path / "double.onnx")
    eng = engine_from_onnx(tmp_path / "double.onnx", tmp_path, "double")
    out, (h, c) = eng.run(f["X"], (f["h0"], f["c0"]))
    assert_close(out, ref[0].transpose(0, 2, 1, 3).reshape(6, 3, 8))
    assert_close(c, ref[2])


def test_unsupported_attributes_listed_in_one_error(tmp_path):
    model, _ = node_model("GRU", seed=10)
    model.graph.node[0].attribute.append(helper.make_attribute("frobnicate", 1))
    onnx.save(model, tmp_path / "attr.onnx")
    with pytest.raises(LstmInferError, match=r"node 'rec' \(GRU\): unsupported attribute\(s\) frobnicate"):
        load_onnx(tmp_path / "attr.onnx")


def test_mixed_sequence_lens_refused(tmp_path):
    """Layer 2 without the sequence_lens layer 1 uses would see padded steps: refused, not guessed."""
    model, w = node_model("RNN", I=4, H=4, lens=True, state=False, seed=11)
    g = model.graph
    g.node[0].output[0] = "Y0"
    g.node.append(helper.make_node("Squeeze", ["Y0", "ax"], ["X1"], name="sq"))
    g.node.append(helper.make_node("RNN", ["X1", "W", "R", "B"], ["Y", "Y_h2"], name="rec2", hidden_size=4))
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "ax"))
    onnx.save(model, tmp_path / "lens.onnx")
    with pytest.raises(LstmInferError, match="sequence_lens must be the same graph input for every layer"):
        load_onnx(tmp_path / "lens.onnx")
