"""torch.onnx.export'ed language models converted with load_onnx and matched to PyTorch and onnxruntime;
external data, and the files the converter must refuse with one line naming them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from converters.onnx import load_onnx
from lstm_infer import LstmInferError
from tests.test_onnx_ops import engine_from_onnx
from tests.util import assert_close, scramble

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402

V, E, H = 19, 6, 7
CTORS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class LM(nn.Module):
    def __init__(self, cell, tied=False, batch_first=False, **kw):
        super().__init__()
        self.emb = nn.Embedding(V, E)
        self.rnn = CTORS[cell](E, E if tied else H, batch_first=batch_first, **kw)
        out = (E if tied else H) * (2 if kw.get("bidirectional") else 1)
        self.head = nn.Linear(out, V)
        scramble(self, seed=len(cell) + len(kw), scale=0.7)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


def export(module, args, path, opset, names, outputs, dynamic, **kw):
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=outputs, dynamic_axes=dynamic, **kw)
    return path


def ort_run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def export_lm(tmp_path, cell="lstm", opset=17, batch_first=False, name="lm.onnx", **kw):
    lm = LM(cell, batch_first=batch_first, **kw)
    axes = {0: "B", 1: "T"} if batch_first else {0: "T", 1: "B"}
    ids = torch.zeros((2, 5) if batch_first else (5, 2), dtype=torch.long)
    path = export(lm, (ids,), tmp_path / name, opset, ["ids"], ["logits"], {"ids": axes, "logits": axes})
    return lm, path


LM_CASES = [
    ("lstm", 9, dict(num_layers=2)),
    ("gru", 11, dict(num_layers=2, bidirectional=True)),
    ("rnn", 14, dict(num_layers=2, nonlinearity="relu")),
    ("lstm", 17, dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("gru", 17, dict(num_layers=1, batch_first=True)),
]


@pytest.mark.parametrize("cell,opset,kw", LM_CASES, ids=[f"{c}-op{o}-{'-'.join(k)}" for c, o, k in LM_CASES])
def test_exported_lm_matches_torch_and_ort(cell, opset, kw, tmp_path):
    lm, path = export_lm(tmp_path, cell, opset, **kw)
    model = engine_from_onnx(path, tmp_path)
    bf = kw.get("batch_first", False)
    assert model.config["provenance"]["batch_first"] == bf
    assert model.config["provenance"]["opset"] == opset
    ids = np.random.default_rng(0).integers(0, V, (9, 4))  # not the export's (5, 2): dynamic axes hold
    feed = ids.T if bf else ids
    with torch.no_grad():
        ref = lm(torch.from_numpy(feed)).numpy()
    ref_ort = ort_run(path, {"ids": feed})[0]
    logits, _ = model.logits(ids)
    if bf:
        logits = logits.transpose(1, 0, 2)
    assert_close(logits, ref)
    assert_close(logits, ref_ort)


@pytest.mark.parametrize("fold", [True, False])
def test_tied_embedding_stays_tied(fold, tmp_path):
    lm = LM("lstm", tied=True, num_layers=2)
    path = export(lm, (torch.zeros(5, 2, dtype=torch.long),), tmp_path / "tied.onnx", 14, ["ids"], ["logits"],
                  {"ids": {0: "T", 1: "B"}}, do_constant_folding=fold)
    model = engine_from_onnx(path, tmp_path)
    assert model.config["head"]["tied"] is True
    assert not (model.path / "head.weight.npy").exists()
    ids = np.random.default_rng(1).integers(0, V, (6, 3))
    with torch.no_grad():
        ref = lm(torch.from_numpy(ids)).numpy()
    assert_close(model.logits(ids)[0], ref)


class StatefulLM(LM):
    """Takes and returns the LSTM state, ends in log_softmax: the state inputs are the engine's run-time state."""

    def forward(self, ids, h0, c0):
        y, (h, c) = self.rnn(self.emb(ids), (h0, c0))
        return torch.log_softmax(self.head(y), -1), h, c


def test_state_inputs_and_log_softmax(tmp_path):
    lm = StatefulLM("lstm", num_layers=2, bidirectional=True)
    z = torch.zeros(4, 2, H)
    dyn = {"ids": {0: "T", 1: "B"}, "h0": {1: "B"}, "c0": {1: "B"}}
    path = export(lm, (torch.zeros(5, 2, dtype=torch.long), z, z), tmp_path / "st.onnx", 17, ["ids", "h0", "c0"],
                  ["lp", "hn", "cn"], dyn)
    model = engine_from_onnx(path, tmp_path)
    prov = model.config["provenance"]
    assert prov["final"] == "log_softmax" and prov["state_inputs"] == ["h0", "c0"]
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, (6, 3))
    h0, c0 = (rng.standard_normal((4, 3, H)).astype(np.float32) for _ in range(2))
    with torch.no_grad():
        ref, h, c = (t.numpy() for t in lm(torch.from_numpy(ids), torch.from_numpy(h0), torch.from_numpy(c0)))
    lp, (eh, ec) = model.log_probs(ids, (h0, c0))
    assert_close(lp, ref)
    assert_close(eh, h)
    assert_close(ec, c)


def test_bare_bidirectional_lstm(tmp_path):
    rnn = nn.LSTM(5, H, num_layers=2, bidirectional=True)
    scramble(rnn, seed=3)
    dyn = {"x": {0: "T", 1: "B"}, "y": {0: "T", 1: "B"}}
    path = export(rnn, (torch.zeros(4, 2, 5),), tmp_path / "bare.onnx", 14, ["x"], ["y", "hn", "cn"], dyn)
    model = engine_from_onnx(path, tmp_path)
    assert model.config["embedding"] is None and model.config["head"] is None
    x = np.random.default_rng(3).standard_normal((7, 3, 5)).astype(np.float32)
    with torch.no_grad():
        ref, (h, c) = rnn(torch.from_numpy(x))
    out, (eh, ec) = model.run(x)
    assert_close(out, ref.numpy())
    assert_close(eh, h.numpy())
    assert_close(ec, c.numpy())
    assert_close(out, ort_run(path, {"x": x})[0])


def save_external(path, tmp_path, folder="ext", location="weights.bin"):
    m = onnx.load(str(path))
    out = tmp_path / folder / "model.onnx"
    out.parent.mkdir(exist_ok=True)
    onnx.save_model(m, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return out


def test_external_data(tmp_path):
    lm, path = export_lm(tmp_path, "gru", 14, num_layers=2)
    ext = save_external(path, tmp_path)
    assert onnx.load(str(ext), load_external_data=False).graph.initializer[0].external_data
    model = engine_from_onnx(ext, tmp_path)
    ids = np.random.default_rng(4).integers(0, V, (5, 2))
    with torch.no_grad():
        ref = lm(torch.from_numpy(ids)).numpy()
    assert_close(model.logits(ids)[0], ref)


@pytest.mark.parametrize("location,msg", [("../outside.bin", "resolves outside the model's folder"),
                                          ("/etc/hostname", "is absolute")])
def test_external_data_escaping_the_folder_is_refused(location, msg, tmp_path):
    _, path = export_lm(tmp_path, "rnn", 14, num_layers=1)
    ext = save_external(path, tmp_path)
    (tmp_path / "outside.bin").write_bytes((ext.parent / "weights.bin").read_bytes())
    m = onnx.load(str(ext), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(ext))
    with pytest.raises(LstmInferError, match=msg) as err:
        load_onnx(ext)
    assert str(err.value).startswith(str(ext)) and "\n" not in str(err.value)


def test_unsupported_ops_listed_in_one_error(tmp_path):
    _, path = export_lm(tmp_path, "lstm", 14, num_layers=2)
    m = onnx.load(str(path))
    g = m.graph
    second = [n for n in g.node if n.op_type == "LSTM"][1]
    head = next(n for n in g.node if n.op_type == "MatMul")
    second.input[0], head.input[0] = "erf_out", "sin_out"
    at = [i for i, n in enumerate(g.node) if n is second][0]
    g.node.insert(at, helper.make_node("Erf", [[n for n in g.node if n.op_type == "Squeeze"][0].output[0]],
                                       ["erf_out"], name="my_erf"))
    g.node.insert(len(g.node) - 2, helper.make_node("Sin", [[n for n in g.node if n.op_type == "Squeeze"][-1]
                                                            .output[0]], ["sin_out"], name="my_sin"))
    onnx.save(m, str(path))
    with pytest.raises(LstmInferError) as err:
        load_onnx(path)
    msg = str(err.value)
    assert "node 'my_erf' (Erf): unsupported op" in msg and "node 'my_sin' (Sin): unsupported op" in msg
    assert msg.startswith(str(path)) and "\n" not in msg


def test_glue_that_reorders_features_is_refused(tmp_path):
    """Bidirectional output flattened as (H, D) instead of (D, H) would interleave directions: refused."""
    _, path = export_lm(tmp_path, "gru", 14, num_layers=2, bidirectional=True)
    m = onnx.load(str(path))
    tr = next(n for n in m.graph.node if n.op_type == "Transpose")
    tr.attribute[0].CopyFrom(helper.make_attribute("perm", [0, 2, 3, 1]))
    onnx.save(m, str(path))
    with pytest.raises(LstmInferError, match="features are not the previous stage's output in order"):
        load_onnx(path)


def test_broken_files_are_refused(tmp_path):
    _, path = export_lm(tmp_path, "rnn", 11, num_layers=1)
    data = path.read_bytes()
    cases = {"truncated.onnx": data[: len(data) // 2], "text.onnx": b"this is not a model\n" * 10, "empty.onnx": b""}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(LstmInferError, match="not an ONNX model") as err:
            load_onnx(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)
    with pytest.raises(LstmInferError, match="cannot read"):
        load_onnx(tmp_path / "missing.onnx")

    m = onnx.load(str(path))
    gone = next(t.name for t in m.graph.initializer if "RNN" in t.name)
    kept = [t for t in m.graph.initializer if t.name != gone]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    onnx.save(m, str(tmp_path / "noinit.onnx"))
    with pytest.raises(LstmInferError, match=f"reads '{gone}'.*missing initializer"):
        load_onnx(tmp_path / "noinit.onnx")

    m = onnx.load(str(path))
    sq = next(n for n in m.graph.node if n.op_type == "Squeeze")
    rnn = next(n for n in m.graph.node if n.op_type == "RNN")
    rnn.input[0] = sq.output[0]  # RNN -> Squeeze -> RNN: a cycle
    onnx.save(m, str(tmp_path / "cycle.onnx"))
    with pytest.raises(LstmInferError, match="cycle"):
        load_onnx(tmp_path / "cycle.onnx")

    m = onnx.load(str(path))
    w = next(t for t in m.graph.initializer if "RNN" in t.name)
    w.CopyFrom(numpy_helper.from_array(np.zeros((1, 3, 6), np.float32), w.name))  # raw_data too short for dims
    w.dims[:] = [1, 1 << 40, 6]
    onnx.save(m, str(tmp_path / "absurd.onnx"))
    with pytest.raises(LstmInferError, match="absurd dimensions"):
        load_onnx(tmp_path / "absurd.onnx")
