"""Hostile inputs, as a user meets them at the command line (issue 8).

Every failure must be: exit code 1, exactly one line on stderr that names the input and the problem, no
Python traceback, nothing on stdout and no output directory (or temporary folder) left behind. Inputs that
are odd but valid (NUL bytes, CRLF, an empty file, a line longer than a read piece) must score.
The table CASES holds, per input: how to build it, the command, the exit code and a fragment of the message.
The end of the file checks that bad token ids are refused by the Python API before any compiled kernel runs.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lstm_infer import format as fmt
from lstm_infer import load
from lstm_infer.cli import main
from lstm_infer.errors import LstmInferError

torch = pytest.importorskip("torch")

WORDS = ["<eos>", "<unk>", "a", "b", "c"]


# --------------------------------------------------------------------------- builders of good inputs

def tiny_model(path: Path, kind: str = "byte", *, cell: str = "lstm", E: int = 4, H: int = 8, seed: int = 0,
               unk: bool = True) -> Path:
    """A model directory with U(-0.6, 0.6) weights: byte (V=256, eos '\\n') or word (WORDS) tokenizer."""
    if kind == "byte":
        vocab, tok = [chr(i) for i in range(256)], {"kind": "byte", "bos": None, "eos": "\n", "unk": None}
    else:
        vocab, tok = WORDS, {"kind": "word", "bos": None, "eos": "<eos>", "unk": "<unk>" if unk else None}
    V = len(vocab)
    cfg = fmt.make_config([fmt.layer_config(cell, E, H)], embedding={"vocab_size": V, "dim": E},
                          head={"output_size": V, "input_size": H, "tied": False, "bias": True}, tokenizer=tok)
    rng = np.random.default_rng(seed)
    tensors = {k: rng.uniform(-0.6, 0.6, s).astype(np.float32) for k, s in fmt.expected_tensors(cfg).items()}
    return fmt.write_model(path, cfg, tensors, vocab)


class TorchLM(torch.nn.Module):
    def __init__(self, V: int = 7, E: int = 3, H: int = 4):
        super().__init__()
        self.encoder, self.rnn, self.decoder = torch.nn.Embedding(V, E), torch.nn.LSTM(E, H), torch.nn.Linear(H, V)


def torch_checkpoint(path: Path, nan: bool = False) -> Path:
    sd = TorchLM().state_dict()
    if nan:
        sd["decoder.bias"][0] = float("nan")
    torch.save(sd, path)
    return path


def onnx_lm(V: int = 7, E: int = 3, H: int = 4, seed: int = 0) -> onnx.ModelProto:
    """ids (T, B) -> Gather -> LSTM -> Squeeze -> MatMul -> Add -> logits (T, B, V), opset 14."""
    rng = np.random.default_rng(seed)
    u = lambda *s: rng.uniform(-0.6, 0.6, s).astype(np.float32)
    inits = {"emb": u(V, E), "W": u(1, 4 * H, E), "R": u(1, 4 * H, H), "B": u(1, 8 * H), "hw": u(H, V),
             "hb": u(V), "axes": np.array([1], np.int64)}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
             helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], name="lstm", hidden_size=H),
             helper.make_node("Squeeze", ["Y", "axes"], ["y"], name="squeeze"),
             helper.make_node("MatMul", ["y", "hw"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "hb"], ["logits"], name="add")]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["T", "B"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def onnx_external(tmp: Path, location: str | None = None) -> Path:
    """The ONNX LM with its weights in tmp/onnx/w.bin; ``location`` then rewrites every tensor's location."""
    folder = tmp / "onnx"
    folder.mkdir()
    path = folder / "lm.onnx"
    onnx.save(onnx_lm(), str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    if location is not None:
        m = onnx.load(str(path), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(m, str(path))
    return path


class Evil:
    """Unpickling this runs open(marker, 'w'): a marker file proves that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


# --------------------------------------------------------------------------- mutations

def edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def layer0(fn: Callable[[dict], object]) -> Callable[[dict], object]:
    return lambda c: fn(c["layers"][0])


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def lying_npy() -> bytes:
    """A valid .npy header that claims 10^9 rows, followed by 16 bytes of data."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 4), }"
    header += " " * (118 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\x00" * 16


def feed_fifo(fifo: Path) -> None:
    """Give a FIFO a writer so that a reader gets garbage and EOF instead of blocking the test forever."""
    def write():
        with open(fifo, "wb") as f:
            f.write(b"not an array")
    threading.Thread(target=write, daemon=True).start()


def zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def safetensors_blob(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


def onnx_edit(fn: Callable[[onnx.ModelProto], object]) -> onnx.ModelProto:
    m = onnx_lm()
    fn(m)
    return m


def drop_initializer(m: onnx.ModelProto, name: str) -> None:
    kept = [t for t in m.graph.initializer if t.name != name]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)


def make_cycle(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[0] = "y"  # LSTM reads the Squeeze of its own output


def absurd_weight(m: onnx.ModelProto) -> None:
    w = next(t for t in m.graph.initializer if t.name == "R")
    w.dims[:] = [1, 1 << 40, 4]


# --------------------------------------------------------------------------- the table

@dataclass
class Env:
    """What a case builder gets: a fresh folder, good models to break (copies) and the marker path."""

    tmp: Path
    byte: Path
    word: Path

    @property
    def marker(self) -> Path:
        return self.tmp / "MARKER"

    def model(self, kind: str = "byte", **kw) -> Path:
        return tiny_model(self.tmp / "m", kind, **kw)

    def file(self, name: str, data: bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(data)
        return p


@dataclass
class Case:
    build: Callable[[Env], tuple[list[str], Path | str]]  # -> (CLI args, the input the message must name)
    code: int
    msg: str
    stdin: bytes | None = None


def info(path: Path) -> tuple[list[str], Path]:
    return ["info", str(path)], path


def info_after(env: Env, change: Callable[[Path], object], named: str | None = None) -> tuple[list[str], Path]:
    """info on a copy of the byte model after ``change``; the message names ``named`` inside it (default: dir)."""
    m = env.model()
    change(m)
    return ["info", str(m)], m / named if named else m


def convert(env: Env, src: Path, *extra: str) -> tuple[list[str], Path]:
    return ["convert", str(src), "-o", str(env.tmp / "out"), *extra], src


def convert_vocab(env: Env, vocab: Path) -> tuple[list[str], Path]:
    """convert a good checkpoint with a bad --vocab: the message names the vocabulary file."""
    return convert(env, torch_checkpoint(env.tmp / "g.pt"), "--vocab", str(vocab))[0], vocab


def score(env: Env, name: str, data: bytes, *extra: str, model: Path | None = None) -> tuple[list[str], Path]:
    f = env.file(name, data)
    return ["score", str(f), "-m", str(model or env.byte), "--threads", "1", *extra], f


def symlink_out(m: Path, name: str) -> None:
    outside = m.parent / f"outside-{name}"
    outside.write_bytes((m / name).read_bytes())
    (m / name).unlink()
    os.symlink(outside, m / name)


def replace(m: Path, name: str, data: bytes) -> None:
    (m / name).write_bytes(data)


def fifo_tensor(m: Path) -> None:
    (m / "head.bias.npy").unlink()
    os.mkfifo(m / "head.bias.npy")
    feed_fifo(m / "head.bias.npy")


def dir_tensor(m: Path) -> None:
    (m / "embedding.npy").unlink()
    (m / "embedding.npy").mkdir()


def word_no_unk(env: Env) -> Path:
    return tiny_model(env.tmp / "nounk", "word", unk=False)


DEEP = b"[" * 100_000 + b"]" * 100_000
V, E, H = 256, 4, 8

CASES: dict[str, Case] = {
    # ---- model directories
    "dir-missing": Case(lambda e: info(e.tmp / "nothing"), 1, "is not a model directory"),
    "dir-is-a-file": Case(lambda e: info(e.file("model.bin", b"x")), 1, "is not a model directory"),
    "config-missing": Case(lambda e: info_after(e, lambda m: (m / "config.json").unlink(), "config.json"),
                           1, "missing: not a model directory"),
    "config-not-json": Case(lambda e: info_after(e, lambda m: replace(m, "config.json", b"{nope"), "config.json"),
                            1, "not valid JSON"),
    "config-binary": Case(lambda e: info_after(e, lambda m: replace(m, "config.json", bytes(range(256))),
                                               "config.json"), 1, "not valid JSON"),
    "config-deep-nesting": Case(lambda e: info_after(e, lambda m: replace(m, "config.json", DEEP), "config.json"),
                                1, "not valid JSON"),
    "config-future-version": Case(lambda e: info_after(e, lambda m: edit_json(
        m / "config.json", lambda c: c.update(format_version=99)), "config.json"), 1, "format_version 99 is not"),
    "config-other-format": Case(lambda e: info_after(e, lambda m: edit_json(
        m / "config.json", lambda c: c.update(format="gguf")), "config.json"), 1, "not an lstm-infer model"),
    "config-absurd-hidden": Case(lambda e: info_after(e, lambda m: edit_json(
        m / "config.json", layer0(lambda ly: ly.update(hidden_size=10**12))), "config.json"),
        1, "'hidden_size' must be an integer in"),
    "config-absurd-params": Case(lambda e: info_after(e, lambda m: edit_json(m / "config.json", lambda c: (
        c["embedding"].update(vocab_size=4_000_000, dim=4_000_000), c["layers"][0].update(input_size=4_000_000))),
        "config.json"), 1, "parameters is more than this engine accepts"),
    "config-negative-dim": Case(lambda e: info_after(e, lambda m: edit_json(
        m / "config.json", lambda c: c["embedding"].update(dim=-4)), "config.json"), 1, "'dim' must be an integer"),
    "config-bool-size": Case(lambda e: info_after(e, lambda m: edit_json(
        m / "config.json", layer0(lambda ly: ly.update(hidden_size=True))), "config.json"), 1, "'hidden_size'"),
    "config-link-out": Case(lambda e: info_after(e, lambda m: symlink_out(m, "config.json"), "config.json"),
                            1, "is a link leading out of the model directory"),
    "npy-truncated": Case(lambda e: info_after(e, lambda m: replace(
        m, "embedding.npy", (m / "embedding.npy").read_bytes()[:100]), "embedding.npy"), 1, "not a readable .npy"),
    "npy-empty": Case(lambda e: info_after(e, lambda m: replace(m, "embedding.npy", b""), "embedding.npy"),
                      1, "not a readable .npy"),
    "npy-header-lies": Case(lambda e: info_after(e, lambda m: replace(m, "embedding.npy", lying_npy()),
                                                 "embedding.npy"), 1, "not a readable .npy"),
    "npy-pickled-objects": Case(lambda e: info_after(e, lambda m: replace(m, "embedding.npy", npy(
        np.array([Evil(e.marker)] * (V * E), dtype=object).reshape(V, E))), "embedding.npy"),
        1, "not a readable .npy"),
    "npy-float64": Case(lambda e: info_after(e, lambda m: replace(m, "embedding.npy", npy(np.zeros((V, E)))),
                                             "embedding.npy"), 1, "dtype is <f8"),
    "npy-int32": Case(lambda e: info_after(e, lambda m: replace(m, "head.bias.npy", npy(np.zeros(V, np.int32))),
                                           "head.bias.npy"), 1, "dtype is <i4"),
    "npy-wrong-shape": Case(lambda e: info_after(e, lambda m: replace(
        m, "embedding.npy", npy(np.zeros((E, V), np.float32))), "embedding.npy"), 1, "shape is (4, 256)"),
    "npy-fortran": Case(lambda e: info_after(e, lambda m: replace(
        m, "layers.0.fw.w_ih.npy", npy(np.asfortranarray(np.ones((4 * H, E), np.float32)))),
        "layers.0.fw.w_ih.npy"), 1, "Fortran order"),
    "npy-nan": Case(lambda e: info_after(e, lambda m: replace(
        m, "layers.0.fw.w_hh.npy", npy(np.full((4 * H, H), np.nan, np.float32))), "layers.0.fw.w_hh.npy"),
        1, "holds NaN or Inf"),
    "npy-inf": Case(lambda e: info_after(e, lambda m: replace(
        m, "head.bias.npy", npy(np.r_[np.zeros(V - 1), np.inf].astype(np.float32))), "head.bias.npy"),
        1, "holds NaN or Inf"),
    "npy-extra-file": Case(lambda e: info_after(e, lambda m: replace(m, "spare.npy", npy(np.zeros(3, np.float32))),
                                                "spare.npy"), 1, "unexpected tensor file"),
    "npy-missing": Case(lambda e: info_after(e, lambda m: (m / "head.weight.npy").unlink(), "head.weight.npy"),
                        1, "missing tensor file"),
    "npy-link-out": Case(lambda e: info_after(e, lambda m: symlink_out(m, "embedding.npy"), "embedding.npy"),
                         1, "is a link leading out of the model directory"),
    "npy-fifo": Case(lambda e: info_after(e, fifo_tensor, "head.bias.npy"), 1, "is not a regular file"),
    "npy-directory": Case(lambda e: info_after(e, dir_tensor, "embedding.npy"), 1, "is not a regular file"),
    "vocab-link-out": Case(lambda e: info_after(e, lambda m: symlink_out(m, "vocab.json"), "vocab.json"),
                           1, "is a link leading out of the model directory"),
    "vocab-not-a-list": Case(lambda e: info_after(e, lambda m: replace(m, "vocab.json", b'{"a": 1}'), "vocab.json"),
                             1, "must be a JSON list of token strings"),
    "vocab-deep-nesting": Case(lambda e: info_after(e, lambda m: replace(m, "vocab.json", DEEP), "vocab.json"),
                               1, "not valid JSON"),
    "vocab-byte-order": Case(lambda e: info_after(e, lambda m: replace(
        m, "vocab.json", json.dumps([chr(i) for i in range(255, -1, -1)]).encode()), "vocab.json"),
        1, "first 256 tokens must be the bytes"),
    # ---- checkpoints
    "ckpt-missing": Case(lambda e: convert(e, e.tmp / "nothing.pt"), 1, "file not found"),
    "ckpt-empty": Case(lambda e: convert(e, e.file("m.pt", b"")), 1, "the file is empty"),
    "ckpt-directory": Case(lambda e: convert(e, e.tmp), 1, "is not a file"),
    "ckpt-text": Case(lambda e: convert(e, e.file("m.pt", b"hello, world\n" * 10)), 1, "not a recognised checkpoint"),
    "ckpt-pickle-runs-code": Case(lambda e: convert(e, e.file("m.pt", pickle.dumps(
        {"w": Evil(e.marker)}, protocol=2))), 1, "holds Python objects (io.open)"),
    "ckpt-torch-zip-runs-code": Case(lambda e: (torch.save({"w": Evil(e.marker)}, e.tmp / "z.pt"),
                                                convert(e, e.tmp / "z.pt"))[1], 1, "holds Python objects"),
    "ckpt-zip-truncated": Case(lambda e: convert(e, e.file("t.pt", torch_checkpoint(e.tmp / "g.pt").read_bytes()[
        :700])), 1, "truncated or corrupt"),
    "ckpt-zip-not-torch": Case(lambda e: convert(e, zip_with(e.tmp / "z.pt", {"readme.txt": b"hi"})),
                               1, "neither a torch.save checkpoint nor a TorchScript archive"),
    "ckpt-zip-garbage-pickle": Case(lambda e: convert(e, zip_with(e.tmp / "z.pt", {
        "archive/data.pkl": b"\x80\x02garbage", "archive/version": b"3\n"})), 1, "truncated or corrupt"),
    "ckpt-nan-weights": Case(lambda e: convert(e, torch_checkpoint(e.tmp / "n.pt", nan=True)),
                             1, "the weights for 'head.bias' hold NaN or Inf"),
    "ckpt-out-exists": Case(lambda e: (["convert", str(torch_checkpoint(e.tmp / "g.pt")), "-o", str(e.byte)],
                                       e.byte), 1, "already exists (use --force"),
    "ckpt-vocab-deep": Case(lambda e: convert_vocab(e, e.file("v.json", DEEP)), 1, "not valid JSON"),
    "ckpt-vocab-missing": Case(lambda e: convert_vocab(e, e.tmp / "v.txt"), 1, "vocabulary file not found"),
    "safetensors-absurd-header": Case(lambda e: convert(e, e.file("m.safetensors", safetensors_blob(
        b'{"a": 1}', length=1 << 62))), 1, "not a readable .safetensors file"),
    "safetensors-bad-offsets": Case(lambda e: convert(e, e.file("m.safetensors", safetensors_blob(
        {"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}, b"\x00" * 16))),
        1, "not a readable .safetensors file"),
    "onnx-truncated": Case(lambda e: convert(e, e.file("m.onnx", onnx_lm().SerializeToString()[:150])),
                           1, "not an ONNX model, or a truncated one"),
    "onnx-external-escapes": Case(lambda e: convert(e, onnx_external(e.tmp, "../../outside.bin")),
                                  1, "resolves outside the model's folder"),
    "onnx-external-absolute": Case(lambda e: convert(e, onnx_external(e.tmp, "/etc/hostname")), 1, "is absolute"),
    "onnx-external-link-out": Case(lambda e: (convert(e, onnx_external(e.tmp)), symlink_out(
        e.tmp / "onnx", "w.bin"))[0], 1, "resolves outside the model's folder"),
    "onnx-external-short": Case(lambda e: (convert(e, onnx_external(e.tmp)),
                                           replace(e.tmp / "onnx", "w.bin", b"\x00" * 8))[0], 1, "is too short"),
    "onnx-missing-initializer": Case(lambda e: convert(e, e.file("m.onnx", onnx_edit(
        lambda m: drop_initializer(m, "R")).SerializeToString())), 1, "reads 'R', which no node, initializer"),
    "onnx-cycle": Case(lambda e: convert(e, e.file("m.onnx", onnx_edit(make_cycle).SerializeToString())),
                       1, "the graph has a cycle"),
    "onnx-absurd-shape": Case(lambda e: convert(e, e.file("m.onnx", onnx_edit(absurd_weight).SerializeToString())),
                              1, "absurd dimensions"),
    # ---- text
    "text-missing": Case(lambda e: (["score", str(e.tmp / "t.txt"), "-m", str(e.byte)], e.tmp / "t.txt"),
                         1, "no such file"),
    "text-directory": Case(lambda e: (["score", str(e.tmp), "-m", str(e.byte)], e.tmp), 1, "is a directory"),
    "text-invalid-utf8": Case(lambda e: score(e, "t.txt", b"fine\nbad \xff\xfe here\n"), 1, "t.txt:2: not valid UTF-8"),
    "text-binary": Case(lambda e: score(e, "t.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8),
                        1, "not valid UTF-8"),
    "text-cut-utf8-at-eof": Case(lambda e: score(e, "t.txt", "ok\ncaf\u00e9".encode()[:-1]),
                                 1, "t.txt:2: not valid UTF-8"),
    "text-stdin-invalid": Case(lambda e: (["score", "-", "-m", str(e.byte)], "<stdin>"), 1,
                               "<stdin>:3: not valid UTF-8", stdin=b"a\nb\n\xc0\x80\n"),
    "text-oov-no-unk": Case(lambda e: score(e, "w.txt", b"a b\na zz b\n", model=word_no_unk(e)),
                            1, "w.txt:2: token 'zz' is not in the vocabulary"),
    "text-bad-model": Case(lambda e: (["score", "-m", str(e.tmp / "nothing")], e.tmp / "nothing"), 1,
                           "is not a model directory", stdin=b"a\n"),
    # odd but valid text: these must score
    "text-empty": Case(lambda e: score(e, "t.txt", b"", "--format", "json"), 0, '"tokens": 0'),
    "text-nul-bytes": Case(lambda e: score(e, "t.txt", b"a\x00b\x00\n\x00\n", "--format", "json"), 0, '"tokens": 7'),
    "text-crlf": Case(lambda e: score(e, "t.txt", b"ab\r\ncd\r\n", "--format", "json"), 0, '"tokens": 6'),
    "text-long-line": Case(lambda e: score(e, "t.txt", (b"c" * 999 + b" ") * 3000 + b"\n", "--format", "json",
                                           model=e.word), 0, '"tokens": 3001'),
    "text-lines-after-a-long-line": Case(lambda e: score(e, "t.txt", (b"c" * 999 + b" ") * 1500 + b"\n" + b"a b\n" * 3,
                                                         "--format", "json", model=e.word), 0, '"lines_scored": 4'),
    "text-word-longer-than-a-piece": Case(lambda e: score(e, "t.txt", b"q" * 1_500_000 + b" a\n", "--format", "json",
                                                          model=e.word), 0, '"tokens": 3'),
    "text-binary-replaced": Case(lambda e: score(e, "t.bin", bytes(range(128, 256)), "--encoding-errors", "replace",
                                                 "--format", "json"), 0, '"tokens": 385'),
    # ---- generate
    "generate-oov-prompt": Case(lambda e: (["generate", "a zz", "-m", str(word_no_unk(e)), "--max-tokens", "2"],
                                           "prompt 'a zz'"), 1, "token 'zz' is not in the vocabulary"),
    "generate-bad-option": Case(lambda e: (["generate", "ab", "-m", str(e.byte), "--max-tokens", "-1"], "max_new"),
                                1, "must be an integer"),
    "generate-bad-model": Case(lambda e: (["generate", "-m", str(e.tmp / "nothing")], e.tmp / "nothing"),
                               1, "is not a model directory"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("good")
    return tiny_model(base / "byte"), tiny_model(base / "word", "word")


def run_cli(args: list[str], stdin: bytes | None = None):
    return CliRunner().invoke(main, args, input=stdin)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name, tmp_path, good):
    case = CASES[name]
    env = Env(tmp_path, *good)
    args, named = case.build(env)
    before = set(tmp_path.iterdir())
    res = run_cli(args, case.stdin)
    err_lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stdout + res.stderr
    assert res.exit_code == case.code, (res.exit_code, res.stderr)
    assert not env.marker.exists(), "code from the input ran"
    if case.code == 0:
        assert case.msg in res.stdout
        assert len(err_lines) == 1 and err_lines[0].startswith("lstm-infer: ")  # the timing line
        return
    assert isinstance(res.exception, SystemExit)
    assert len(err_lines) == 1, res.stderr
    assert err_lines[0].startswith("lstm-infer: error: "), err_lines[0]
    assert case.msg in err_lines[0] and str(named) in err_lines[0], err_lines[0]
    assert res.stdout == ""
    # nothing written: no output directory, no temporary folder beside it
    assert set(tmp_path.iterdir()) <= before, set(tmp_path.iterdir()) - before
    if args[0] == "convert" and args[-2:] != ["-o", str(env.byte)]:
        assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    res = run_cli(["--debug", "info", str(tmp_path / "nothing")])
    assert res.exit_code == 1 and "Traceback" in res.stderr and "LstmInferError" in res.stderr


def test_crlf_scores_as_lf(tmp_path, good):
    lf, crlf = tmp_path / "lf.txt", tmp_path / "crlf.txt"
    lf.write_bytes(b"one line\nand another\n")
    crlf.write_bytes(b"one line\r\nand another\r\n")
    out = [json.loads(run_cli(["score", str(f), "-m", str(good[0]), "--format", "json"]).stdout) for f in (lf, crlf)]
    assert out[0] == out[1]


def test_marker_pickles_in_a_real_process(tmp_path):
    """The same refusals in a fresh interpreter, through the installed entry point: still no code runs."""
    marker = tmp_path / "MARKER"
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"w": Evil(marker)}, protocol=2))
    torch.save({"w": Evil(marker)}, tmp_path / "zip.pt")
    for src in (legacy, tmp_path / "zip.pt"):
        res = subprocess.run([sys.executable, "-c", "from lstm_infer.cli import main; main()", "convert", str(src),
                              "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr.count("\n") == 1 and str(src) in res.stderr and "holds Python objects" in res.stderr
        assert not marker.exists() and not (tmp_path / "out").exists()


def test_cases_are_many_and_builders_are_sound(tmp_path, good):
    """At least 30 hostile inputs, and the good inputs they start from really are good."""
    assert sum(c.code != 0 for c in CASES.values()) >= 30
    env = Env(tmp_path, *good)
    for args in (convert(env, torch_checkpoint(tmp_path / "g.pt"))[0], convert(env, onnx_external(tmp_path))[0]):
        res = run_cli(args)
        assert res.exit_code == 0, res.stderr
        load(tmp_path / "out")
        os.rename(tmp_path / "out", tmp_path / f"ok-{args[1][-4:]}")
    assert run_cli(["info", str(env.model())]).exit_code == 0


# --------------------------------------------------------------------------- token ids at the API

BAD_IDS = {
    "negative": lambda s: np.full(s, -1),
    "equal-V": lambda s: np.full(s, 256),
    "huge": lambda s: np.full(s, 1 << 40),
    "uint64-max": lambda s: np.full(s, np.iinfo(np.uint64).max, np.uint64),
    "python-bigint": lambda s: np.full(s, 1 << 70, dtype=object),
    "float": lambda s: np.ones(s, np.float32),
    "float-integral-list": lambda s: np.ones(s).tolist(),
    "bool": lambda s: np.ones(s, bool),
    "strings": lambda s: np.full(s, "1"),
    "none": lambda s: np.full(s, None),
    "3-d": lambda s: np.ones((3, 2, 2), np.int64),
    "ragged": lambda s: [[1, 2], [3, [4]]] if len(s) == 2 else [1, [2]],
}
CALLS = {
    "logits": (2, lambda m, x: m.logits(x)),
    "log_probs": (2, lambda m, x: m.log_probs(x)),
    "target_log_probs-inputs": (2, lambda m, x: m.target_log_probs(x, np.zeros((3, 2), np.int64))),
    "target_log_probs-targets": (2, lambda m, x: m.target_log_probs(np.zeros((3, 2), np.int64), x)),
    "step": (1, lambda m, x: m.step(x)),
    "generate_ids": (1, lambda m, x: m.generate_ids(x, max_new_tokens=2)),
    "generate_ids-batch": (2, lambda m, x: m.generate_ids(x, max_new_tokens=2)),
}


@pytest.fixture(scope="module")
def byte_model(good):
    return load(good[0])


@pytest.fixture
def no_kernels(monkeypatch):
    """Every way into compiled code raises: a refusal must come before any of them."""
    import lstm_infer.decoding as decoding
    from lstm_infer import head, recurrent

    def boom(*a, **k):
        raise AssertionError("a kernel was reached")
    monkeypatch.setattr(recurrent, "run_stack", boom)
    for name in ("logits", "log_probs", "target_log_probs"):
        monkeypatch.setattr(head, name, boom)
    monkeypatch.setattr(decoding, "_decode", boom)
    monkeypatch.setattr(decoding, "step", boom)


# decoding.generate_ids converts ragged prompts with np.asarray itself (a ValueError): left to its owner.
ID_CASES = [(c, b) for b in BAD_IDS for c in CALLS if not (b == "ragged" and c.startswith("generate_ids"))]


@pytest.mark.parametrize("call,bad", ID_CASES)
def test_bad_token_ids_are_refused_before_kernels(byte_model, no_kernels, call, bad):
    ndim, fn = CALLS[call]
    shape = (3, 2) if ndim == 2 else (3,)
    if call == "generate_ids-batch" and bad == "float-integral-list":
        shape = (2, 3)
    with pytest.raises(LstmInferError) as err:
        fn(byte_model, BAD_IDS[bad](shape))
    assert "\n" not in str(err.value)


def test_good_ids_and_empty_batches_still_run(byte_model):
    ids = np.array([[1, 255], [0, 7], [10, 20]])
    lp, _ = byte_model.log_probs(ids)
    assert lp.shape == (3, 2, 256) and np.allclose(np.exp(lp).sum(-1), 1, atol=1e-5)
    tl, _ = byte_model.target_log_probs(ids.astype(np.int32), ids.astype(np.uint8))
    np.testing.assert_allclose(tl, np.take_along_axis(lp, ids[..., None], 2)[..., 0], atol=1e-5)
    for shape in ((0, 2), (2, 0), (0, 0)):
        empty = np.zeros(shape, np.int64)
        assert byte_model.logits(empty)[0].shape == (*shape, 256)
        assert byte_model.target_log_probs(empty, empty)[0].shape == shape
    assert byte_model.step(np.zeros(0, np.int64))[0].shape == (0, 256)


def test_bad_text_at_the_api(byte_model):
    for bad, msg in (("a\ud800", r"lone surrogate U\+D800"), ([b"bytes"], "a string or a list of strings"),
                     (None, "a string or a list of strings"), ("ok\udcff", "<text>:1: not valid UTF-8")):
        with pytest.raises(LstmInferError, match=msg):
            byte_model.score(bad)
