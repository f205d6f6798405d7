"""PyTorch checkpoints -> model directories: every supported structure round-trips to PyTorch's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lstm_infer  # noqa: E402
from converters import convert, detect_kind  # noqa: E402
from lstm_infer.errors import LstmInferError  # noqa: E402
from tests.util import assert_close, scramble  # noqa: E402

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
T, B = 5, 3


class LM(nn.Module):
    """embedding -> recurrent -> Linear, under any attribute names (word_language_model, tutorials)."""

    def __init__(self, rnn: nn.Module, V: int, K: int | None = None, names=("encoder", "rnn", "decoder"),
                 tie: bool = False, bias: bool = True):
        super().__init__()
        self.names = names
        D = 2 if rnn.bidirectional else 1
        feat = D * (getattr(rnn, "proj_size", 0) or rnn.hidden_size)
        setattr(self, names[0], nn.Embedding(V, rnn.input_size))
        setattr(self, names[1], rnn)
        setattr(self, names[2], nn.Linear(feat, K or V, bias=bias))
        if tie:
            getattr(self, names[2]).weight = getattr(self, names[0]).weight

    def forward(self, ids):
        emb, rnn, head = (getattr(self, n) for n in self.names)
        out, _ = rnn(emb(ids))
        return head(out)


def make_lm(cell="lstm", V=13, E=6, H=7, seed=0, **kw) -> LM:
    rnn_kw = {k: kw.pop(k) for k in ("num_layers", "proj_size", "bidirectional", "nonlinearity") if k in kw}
    lm = LM(CELLS[cell](E, H, **rnn_kw), V, **kw)
    scramble(lm, seed)
    return lm.eval()


def ids_for(V: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (T, B))


def check_logits(out, lm, V):
    model = lstm_infer.load(out)
    ids = ids_for(V)
    with torch.no_grad():
        ref = lm(torch.from_numpy(ids)).numpy()
    assert_close(model.logits(ids)[0], ref)
    return model


def tensor_files(out) -> set[str]:
    return {p.name[:-4] for p in out.glob("*.npy")}


# --------------------------------------------------------------------------- structures

def test_wlm_lstm_untied_with_text_vocab(tmp_path):
    lm = make_lm(num_layers=2)
    torch.save(lm.state_dict(), tmp_path / "model.pt")
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(11)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    out = convert(tmp_path / "model.pt", tmp_path / "out", vocab=tmp_path / "vocab.txt")
    model = check_logits(out, lm, 13)
    assert model.vocab == words
    tok = model.config["tokenizer"]
    assert (tok["kind"], tok["eos"], tok["unk"], tok["bos"]) == ("word", "<eos>", "<unk>", None)
    assert model.config["head"]["tied"] is False and len(model.config["layers"]) == 2
    prov = model.config["provenance"]
    assert prov["source"] == "model.pt" and prov["source_kind"] == "torch-zip" and len(prov["sha256"]) == 64
    assert prov["converter"] == f"lstm-infer {lstm_infer.__version__}"


def test_wlm_lstm_tied(tmp_path):
    lm = make_lm(num_layers=2, H=6, tie=True)
    torch.save(lm.state_dict(), tmp_path / "model.pt")
    out = convert(tmp_path / "model.pt", tmp_path / "out")
    model = check_logits(out, lm, 13)
    assert model.config["head"]["tied"] is True and "head.weight" not in tensor_files(out)
    assert model.config["tokenizer"] is None  # no vocabulary anywhere: token ids only


def test_gru_legacy_pickle(tmp_path):
    lm = make_lm("gru", num_layers=2)
    torch.save(lm.state_dict(), tmp_path / "model.pt", _use_new_zipfile_serialization=False)
    assert detect_kind(tmp_path / "model.pt") == "torch-legacy-pickle"
    model = check_logits(convert(tmp_path / "model.pt", tmp_path / "out"), lm, 13)
    assert model.config["layers"][0]["cell"] == "gru"


def test_rnn_relu(tmp_path):
    lm = make_lm("rnn", num_layers=2, nonlinearity="relu")
    torch.save(lm.state_dict(), tmp_path / "model.pt")
    model = check_logits(convert(tmp_path / "model.pt", tmp_path / "out", nonlinearity="relu"), lm, 13)
    assert model.config["provenance"]["nonlinearity"] == "relu"
    assert model.config["layers"][1]["activations"][0][0]["name"] == "relu"


def test_relu_refused_for_lstm(tmp_path):
    torch.save(make_lm().state_dict(), tmp_path / "model.pt")
    with pytest.raises(LstmInferError, match="nn.RNN only"):
        convert(tmp_path / "model.pt", tmp_path / "out", nonlinearity="relu")


def test_proj_size_tutorial_names(tmp_path):
    lm = make_lm(num_layers=2, proj_size=4, names=("embedding", "lstm", "fc"))
    torch.save(lm.state_dict(), tmp_path / "model.pth")
    model = check_logits(convert(tmp_path / "model.pth", tmp_path / "out"), lm, 13)
    assert model.config["layers"][0]["proj_size"] == 4


def test_bidirectional_bare_module(tmp_path):
    rnn = nn.LSTM(5, 6, num_layers=2, bidirectional=True)
    scramble(rnn, 3)
    torch.save(rnn.state_dict(), tmp_path / "rnn.bin")
    model = lstm_infer.load(convert(tmp_path / "rnn.bin", tmp_path / "out"))
    assert model.config["embedding"] is None and model.config["head"] is None
    x = np.random.default_rng(0).standard_normal((T, B, 5)).astype(np.float32)
    with torch.no_grad():
        ref, (h, c) = rnn(torch.from_numpy(x))
    out, (h2, c2) = model.run(x)
    assert_close(out, ref.numpy())
    assert_close(h2, h.numpy())
    assert_close(c2, c.numpy())


def test_awd_lstm_weightdrop_modulelist(tmp_path):
    """Three differently sized LSTMs in ``rnns``, named as AWD-LSTM's WeightDrop (salesforce: the wrapped module
    holds ``weight_hh_l0_raw`` and a dropped-out copy under the plain name) and fastai's WeightDropout (the
    wrapper holds ``_raw``), with fastai's duplicate embedding ``encoder_dp.emb`` and a tied decoder."""
    V, E = 11, 6
    emb, lstms = nn.Embedding(V, E), [nn.LSTM(6, 8), nn.LSTM(8, 7), nn.LSTM(7, E)]
    dec = nn.Linear(E, V)
    for k, mod in enumerate([emb, dec, *lstms]):
        scramble(mod, 10 + k)
    dec.weight = emb.weight
    sd = {"encoder.weight": emb.weight, "encoder_dp.emb.weight": emb.weight.clone()}
    for k, lstm in enumerate(lstms):
        for name, t in lstm.state_dict().items():
            if name == "weight_hh_l0" and k != 1:
                if k == 0:  # the stale dropped-out copy comes first: the _raw weight must still win
                    sd[f"rnns.{k}.module.weight_hh_l0"] = t * (torch.rand(t.shape) > 0.5)
                sd[f"rnns.{k}.module.weight_hh_l0_raw"] = t
            elif name == "weight_hh_l0":
                sd[f"rnns.{k}.weight_hh_l0_raw"] = t
            else:
                sd[f"rnns.{k}.module.{name}"] = t
    sd.update({"decoder.weight": dec.weight, "decoder.bias": dec.bias})
    torch.save(sd, tmp_path / "awd.pt")
    model = lstm_infer.load(convert(tmp_path / "awd.pt", tmp_path / "out"))
    assert [ly["hidden_size"] for ly in model.config["layers"]] == [8, 7, 6]
    assert model.config["head"]["tied"] is True
    ids = ids_for(V)
    with torch.no_grad():
        x = emb(torch.from_numpy(ids))
        for lstm in lstms:
            x, _ = lstm(x)
        ref = dec(x).numpy()
    assert_close(model.logits(ids)[0], ref)


def test_tagger_head(tmp_path):
    lm = make_lm(V=13, K=4, names=("word_embeddings", "lstm", "hidden2tag"), bidirectional=True)
    torch.save(lm.state_dict(), tmp_path / "tagger.pt")
    model = check_logits(convert(tmp_path / "tagger.pt", tmp_path / "out"), lm, 13)
    assert model.config["head"]["output_size"] == 4


def test_nested_cuda_checkpoint_with_itos(tmp_path, monkeypatch):
    lm = make_lm(V=5)
    itos = ["<unk>", "<eos>", "a", "b", "c"]
    ckpt = {"epoch": 3, "model_state_dict": lm.state_dict(), "optimizer_state_dict": {"state": {}, "lr": 0.1},
            "itos": itos, "stoi": {t: i for i, t in enumerate(itos)}}
    # Record every storage as living on cuda:0, as a checkpoint saved on a GPU machine does.
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):  # proof the file really asks for CUDA
            torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = check_logits(convert(tmp_path / "ckpt.pt", tmp_path / "out"), lm, 5)
    assert model.vocab == itos and model.config["tokenizer"]["kind"] == "word"


def test_safetensors_tied_without_decoder_weight(tmp_path):
    from safetensors.torch import save_file

    lm = make_lm(H=6, tie=True)
    sd = {k: v.contiguous() for k, v in lm.state_dict().items() if k != "decoder.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"itos": json.dumps([f"t{i}" for i in range(13)])})
    assert detect_kind(tmp_path / "model.safetensors") == "safetensors"
    model = check_logits(convert(tmp_path / "model.safetensors", tmp_path / "out"), lm, 13)
    assert model.config["head"] == {"output_size": 13, "input_size": 6, "tied": True, "bias": True}
    assert model.vocab[3] == "t3"


def test_torchscript_with_vocab_extra_file(tmp_path):
    lm = make_lm("gru", V=9)
    traced = torch.jit.trace(lm, torch.zeros(2, 1, dtype=torch.long))
    vocab = [f"v{i}" for i in range(9)]
    torch.jit.save(traced, str(tmp_path / "lm.pt"), _extra_files={"vocab.json": json.dumps(vocab)})
    assert detect_kind(tmp_path / "lm.pt") == "torchscript"
    model = check_logits(convert(tmp_path / "lm.pt", tmp_path / "out"), lm, 9)
    assert model.vocab == vocab


def test_byte_tokenizer_for_256_rows(tmp_path):
    lm = make_lm(V=256, E=4, H=5)
    torch.save(lm.state_dict(), tmp_path / "m.pt")
    model = check_logits(convert(tmp_path / "m.pt", tmp_path / "out"), lm, 256)
    assert model.config["tokenizer"]["kind"] == "byte" and model.vocab[65] == "A"


# --------------------------------------------------------------------------- vocabulary files

@pytest.mark.parametrize("fmt", ["text", "json-list", "json-object", "json-id-object"])
def test_vocab_file_formats(tmp_path, fmt):
    lm = make_lm(V=5)
    torch.save(lm.state_dict(), tmp_path / "m.pt")
    words = ["<unk>", "</s>", "x", "y", "<s>"]
    body = {"text": "\r\n".join(words) + "\r\n", "json-list": json.dumps(words),
            "json-object": json.dumps({w: i for i, w in reversed(list(enumerate(words)))}),
            "json-id-object": json.dumps({str(i): w for i, w in enumerate(words)})}[fmt]
    path = tmp_path / ("vocab.txt" if fmt == "text" else "vocab.json")
    path.write_text(body, encoding="utf-8")
    model = check_logits(convert(tmp_path / "m.pt", tmp_path / "out", vocab=path, tokenizer="char"), lm, 5)
    assert model.vocab == words
    tok = model.config["tokenizer"]
    assert (tok["kind"], tok["bos"], tok["eos"], tok["unk"]) == ("char", "<s>", "</s>", "<unk>")


def test_vocab_size_mismatch(tmp_path):
    torch.save(make_lm(V=5).state_dict(), tmp_path / "m.pt")
    (tmp_path / "v.txt").write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(LstmInferError, match=r"v\.txt: the vocabulary has 3 tokens but the embedding has 5 rows"):
        convert(tmp_path / "m.pt", tmp_path / "out", vocab=tmp_path / "v.txt")
    assert not (tmp_path / "out").exists()


def test_special_token_must_be_in_vocab(tmp_path):
    torch.save(make_lm(V=3).state_dict(), tmp_path / "m.pt")
    with pytest.raises(LstmInferError, match="eos token '<end>' is not in the vocabulary"):
        convert(tmp_path / "m.pt", tmp_path / "out", vocab=["a", "b", "c"], eos="<end>")


# --------------------------------------------------------------------------- errors and the output directory

def test_pickle_that_needs_code(tmp_path):
    torch.save(make_lm(), tmp_path / "full.pt")
    with pytest.raises(LstmInferError) as err:
        convert(tmp_path / "full.pt", tmp_path / "out")
    msg = str(err.value)
    assert "full.pt" in msg and "LM" in msg and "torch.save(model.state_dict(), path)" in msg and "\n" not in msg


@pytest.mark.parametrize("how", ["zip", "legacy", "safetensors"])
def test_truncated_file(tmp_path, how):
    sd = make_lm().state_dict()
    path = tmp_path / "m.bin"
    if how == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=how == "zip")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LstmInferError, match=r"m\.bin: .*(truncated|corrupt)"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_out_refused_then_forced(tmp_path):
    a, b = make_lm(V=5, seed=1), make_lm(V=7, seed=2)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(b.state_dict(), tmp_path / "b.pt")
    out = convert(tmp_path / "a.pt", tmp_path / "out")
    with pytest.raises(LstmInferError, match="already exists"):
        convert(tmp_path / "b.pt", out)
    check_logits(out, a, 5)
    convert(tmp_path / "b.pt", out, force=True)
    check_logits(out, b, 7)


def test_no_out_left_on_error(tmp_path):
    lm = make_lm()
    sd = lm.state_dict()
    sd["decoder.bias"] = sd["decoder.bias"].clone()
    sd["decoder.bias"][0] = float("nan")  # caught while writing, after the temporary folder exists
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(LstmInferError, match="NaN"):
        convert(tmp_path / "m.pt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_ambiguous_embedding(tmp_path):
    lm = make_lm()
    sd = dict(lm.state_dict(), **{"char_emb.weight": torch.rand(9, 6)})
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(LstmInferError, match=r"embedding \(char_emb \(9, 6\), encoder \(13, 6\)\).*--embedding"):
        convert(tmp_path / "m.pt", tmp_path / "out")


def test_ambiguous_stack_resolved_with_rnn_option(tmp_path):
    first, second = nn.GRU(4, 5), nn.LSTM(5, 3)
    scramble(first, 5)
    scramble(second, 6)
    sd = {f"first.{k}": v for k, v in first.state_dict().items()}
    sd.update({f"second.{k}": v for k, v in second.state_dict().items()})
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(LstmInferError, match=r"several recurrent modules \(first, second\).*--rnn"):
        convert(tmp_path / "m.pt", tmp_path / "out")
    model = lstm_infer.load(convert(tmp_path / "m.pt", tmp_path / "out", rnn="first,second"))
    x = np.random.default_rng(2).standard_normal((T, B, 4)).astype(np.float32)
    with torch.no_grad():
        ref, _ = second(first(torch.from_numpy(x))[0])
    assert_close(model.run(x)[0], ref.numpy())


def test_leftover_tensors_are_an_error(tmp_path):
    sd = dict(make_lm().state_dict(), **{"norm.weight": torch.ones(7), "norm.bias": torch.zeros(7)})
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(LstmInferError, match=r"norm\.bias \(7,\), norm\.weight \(7,\).*ignore"):
        convert(tmp_path / "m.pt", tmp_path / "out")


def test_unused_recurrent_module_is_an_error(tmp_path):
    sd = {f"lstm.{k}": v for k, v in nn.LSTM(4, 5).state_dict().items()}
    sd.update({f"extra.{k}": v for k, v in nn.GRU(5, 2).state_dict().items()})
    torch.save(sd, tmp_path / "m.pt")
    msg = r"outside the chosen stack .*extra\.weight_ih_l0.*not in the stack: extra"
    with pytest.raises(LstmInferError, match=msg):
        convert(tmp_path / "m.pt", tmp_path / "out", rnn="lstm")


def test_lstm_cell_is_explained(tmp_path):
    torch.save(nn.LSTMCell(3, 4).state_dict(), tmp_path / "cell.pt")
    with pytest.raises(LstmInferError, match="LSTMCell"):
        convert(tmp_path / "cell.pt", tmp_path / "out")


def test_detect_kind_rejects_unknown(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"hello world, not a model")
    with pytest.raises(LstmInferError, match="not a recognised checkpoint"):
        detect_kind(tmp_path / "x.pt")
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(LstmInferError, match="empty"):
        detect_kind(tmp_path / "e.pt")
