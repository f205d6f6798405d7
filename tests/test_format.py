"""The model directory: round trip, zero-copy load, and every way a directory can be broken."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lstm_infer import format as fmt
from lstm_infer import load
from lstm_infer.errors import LstmInferError

V, E, H = 11, 4, 5


def small(tmp_path, name="m", **kw):
    rng = np.random.default_rng(0)
    layers = [fmt.layer_config("lstm", E, H)]
    cfg = fmt.make_config(layers, embedding={"vocab_size": V, "dim": E},
                          head={"output_size": V, "input_size": H, "tied": False, "bias": True},
                          tokenizer={"kind": "word", "bos": None, "eos": "t0", "unk": "t1"}, **kw)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in fmt.expected_tensors(cfg).items()}
    vocab = [f"t{i}" for i in range(V)]
    return fmt.write_model(tmp_path / name, cfg, tensors, vocab), cfg, tensors


def test_round_trip_is_zero_copy(tmp_path):
    path, cfg, tensors = small(tmp_path)
    cfg2, t2, vocab = fmt.read_model(path)
    assert cfg2 == json.loads(json.dumps(cfg)) and vocab[0] == "t0"
    for k, v in tensors.items():
        assert isinstance(t2[k], np.memmap) and not t2[k].flags.writeable
        np.testing.assert_array_equal(t2[k], v)


def test_write_is_atomic_and_refuses_existing(tmp_path):
    path, cfg, tensors = small(tmp_path)
    with pytest.raises(LstmInferError, match="already exists"):
        fmt.write_model(path, cfg, tensors, [f"t{i}" for i in range(V)])
    bad = dict(tensors, embedding=np.full((V, E), np.nan, np.float32))
    with pytest.raises(LstmInferError, match="NaN"):
        fmt.write_model(tmp_path / "new", cfg, bad, [f"t{i}" for i in range(V)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folder, no half-written "new"
    fmt.write_model(path, cfg, tensors, [f"t{i}" for i in range(V)], force=True)
    load(path)


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def save(path, name, arr):
    np.save(path / f"{name}.npy", arr, allow_pickle=True)


BREAKERS = {
    "no-config": (lambda p: (p / "config.json").unlink(), "config.json: missing"),
    "bad-json": (lambda p: (p / "config.json").write_text("{nope"), "not valid JSON"),
    "not-object": (lambda p: (p / "config.json").write_text("[1]"), "must hold a JSON object"),
    "wrong-format": (lambda p: edit_config(p, lambda c: c.update(format="gguf")), "not an lstm-infer model"),
    "future-version": (lambda p: edit_config(p, lambda c: c.update(format_version=2)), "format_version 2"),
    "missing-key": (lambda p: edit_config(p, lambda c: c.pop("head")), "missing key 'head'"),
    "absurd-size": (lambda p: edit_config(p, lambda c: c["layers"][0].update(hidden_size=10**9)),
                    "'hidden_size' must be an integer"),
    "too-many-params": (lambda p: edit_config(p, lambda c: (c["embedding"].update(vocab_size=4_000_000, dim=4_000_000),
                                                            c["layers"][0].update(input_size=4_000_000))),
                        "parameters is more than"),
    "size-chain": (lambda p: edit_config(p, lambda c: c["layers"][0].update(input_size=E + 1)),
                   "does not match the previous output size"),
    "bad-cell": (lambda p: edit_config(p, lambda c: c["layers"][0].update(cell="transformer")), "cell"),
    "bad-activation": (lambda p: edit_config(p, lambda c: c["layers"][0]["activations"][0][0].update(name="gelu")),
                       "unknown activation"),
    "negative-clip": (lambda p: edit_config(p, lambda c: c["layers"][0].update(clip=-1)), "'clip'"),
    "missing-tensor": (lambda p: (p / "head.bias.npy").unlink(), "head.bias.npy: missing tensor file"),
    "extra-tensor": (lambda p: save(p, "spare", np.zeros(3, np.float32)), "spare.npy: unexpected tensor"),
    "truncated": (lambda p: (p / "embedding.npy").write_bytes((p / "embedding.npy").read_bytes()[:90]),
                  "embedding.npy: not a readable .npy"),
    "garbage": (lambda p: (p / "embedding.npy").write_bytes(b"\x00" * 64), "embedding.npy: not a readable .npy"),
    "zip-magic": (lambda p: (p / "embedding.npy").write_bytes(b"PK\x03\x04"), "embedding.npy: not a readable .npy"),
    "pickled": (lambda p: save(p, "embedding", np.array([{"a": 1}] * V * E, dtype=object).reshape(V, E)),
                "embedding.npy: not a readable .npy"),
    "float64": (lambda p: save(p, "embedding", np.zeros((V, E))), "dtype is <f8"),
    "big-endian": (lambda p: save(p, "embedding", np.zeros((V, E), ">f4")), "dtype is >f4"),
    "wrong-shape": (lambda p: save(p, "embedding", np.zeros((V, E + 1), np.float32)), "shape is (11, 5)"),
    "fortran": (lambda p: save(p, "layers.0.fw.w_ih", np.asfortranarray(np.zeros((4 * H, E), np.float32))),
                "Fortran order"),
    "nan": (lambda p: save(p, "head.weight", np.full((V, H), np.nan, np.float32)), "NaN or Inf"),
    "inf": (lambda p: save(p, "layers.0.fw.bias", np.full(4 * H, np.inf, np.float32)), "NaN or Inf"),
    "no-vocab": (lambda p: (p / "vocab.json").unlink(), "vocab.json: missing"),
    "short-vocab": (lambda p: (p / "vocab.json").write_text('["a", "b"]'), "has 2 tokens"),
    "dup-vocab": (lambda p: (p / "vocab.json").write_text(json.dumps(["t0"] * V)), "duplicate"),
    "special-missing": (lambda p: edit_config(p, lambda c: c["tokenizer"].update(unk="<zzz>")), "unk token"),
    "escaping-link": (lambda p: ((p / "head.bias.npy").unlink(),
                                 os.symlink(p.parent / "outside.npy", p / "head.bias.npy")),
                      "link leading out"),
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_broken_directory_gives_one_line_error(tmp_path, case):
    path, _, _ = small(tmp_path)
    np.save(tmp_path / "outside.npy", np.zeros(V, np.float32))
    breaker, msg = BREAKERS[case]
    breaker(path)
    with pytest.raises(LstmInferError) as err:
        load(path)
    text = str(err.value)
    assert msg in text and "\n" not in text
    assert str(path) in text  # names the input


def test_not_a_directory(tmp_path):
    with pytest.raises(LstmInferError, match="is not a model directory"):
        load(tmp_path / "nothing")
