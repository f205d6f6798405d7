"""Property tests (hypothesis): loaders fed random or mutated bytes fail only with LstmInferError; tokenizers
round-trip; the text reader keeps lines and words whole; scoring totals are sums of their parts and do not
depend on batch size, block size, stream chunk or read-piece size, and match a float64 NumPy reference."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstm_infer import format as fmt
from lstm_infer import load, scoring
from lstm_infer.errors import LstmInferError
from lstm_infer.model import Model
from lstm_infer.textio import read_pieces
from lstm_infer.tokenizer import Tokenizer
from tests import naive
from tests.test_hostile import WORDS, onnx_lm, tiny_model

EXAMPLES = int(os.environ.get("LSTM_INFER_EXAMPLES", "25"))  # raise it for a long fuzzing run by hand
SETTINGS = dict(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # no lone surrogates: real text has none
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=6)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("props")
    return {"byte": tiny_model(base / "byte", E=3, H=5, seed=1), "word": tiny_model(base / "word", "word", seed=2)}


@pytest.fixture(scope="module")
def loaded(models) -> dict[str, Model]:
    return {k: load(v) for k, v in models.items()}


def fresh_copy(src: Path) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="prop-")) / "m"
    shutil.copytree(src, dst)
    return dst


def loads_or_refuses(path: Path) -> Model | None:
    """load() either gives a Model that runs, or raises LstmInferError; anything else fails the test."""
    try:
        model = load(path)
    except LstmInferError as err:
        assert "\n" not in str(err)
        return None
    if model.embedding is not None and model.head_w is not None:
        model.logits(np.zeros((2, 1), np.int64))
    return model


# --------------------------------------------------------------------------- loaders

@settings(**SETTINGS)
@given(data=st.binary(max_size=300) | JSON.map(lambda v: json.dumps(v).encode()),
       name=st.sampled_from(["config.json", "vocab.json"]))
def test_random_json_file_bytes(models, data, name):
    m = fresh_copy(models["word"])
    (m / name).write_bytes(data)
    assert loads_or_refuses(m) is None
    shutil.rmtree(m.parent)


def paths(obj, pre=()):
    """Every key path into a JSON value."""
    yield pre
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, (*pre, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, (*pre, i))


@settings(**SETTINGS)
@given(data=st.data())
def test_mutated_config(models, data):
    m = fresh_copy(models["word"])
    cfg = json.loads((m / "config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from([p for p in paths(cfg) if p]))
        parent = cfg
        for k in where[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(JSON)
    (m / "config.json").write_text(json.dumps(cfg))
    loads_or_refuses(m)
    shutil.rmtree(m.parent)


NPY_HEADS = st.sampled_from([b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'"])


@settings(**SETTINGS)
@given(head=NPY_HEADS, body=st.binary(max_size=200),
       name=st.sampled_from(["embedding", "head.bias", "layers.0.fw.w_hh"]))
def test_random_npy_bytes(models, head, body, name):
    m = fresh_copy(models["byte"])
    (m / f"{name}.npy").write_bytes(head + body)
    assert loads_or_refuses(m) is None
    shutil.rmtree(m.parent)


MAGIC = st.sampled_from([(b"PK\x03\x04", ".pt"), (b"\x80\x02", ".pt"), (b"\x80\x04\x95", ".bin"),
                         (b"\x10\x00\x00\x00\x00\x00\x00\x00{", ".safetensors"), (b"\x08", ".onnx"), (b"", ".onnx")])


@settings(**SETTINGS)
@given(magic=MAGIC, body=st.binary(max_size=200))
def test_random_checkpoint_bytes(tmp_path_factory, magic, body):
    from converters import convert

    tmp = tmp_path_factory.mktemp("ck")
    src = tmp / f"x{magic[1]}"
    src.write_bytes(magic[0] + body)
    with pytest.raises(LstmInferError) as err:
        convert(src, tmp / "out")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp.iterdir()) == [src.name]  # nothing written


@settings(**SETTINGS)
@given(data=st.data())
def test_mutated_onnx_bytes(tmp_path_factory, data):
    """Bytes of a good ONNX file overwritten at random: refused with one line, or converted to a runnable model."""
    from converters.onnx import load_onnx

    blob = bytearray(onnx_lm().SerializeToString())
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    tmp = tmp_path_factory.mktemp("ox")
    (tmp / "m.onnx").write_bytes(bytes(blob))
    try:
        config, tensors, _ = load_onnx(tmp / "m.onnx")
        fmt.write_model(tmp / "out", config, tensors)
    except LstmInferError as err:
        assert "\n" not in str(err)
        return
    loads_or_refuses(tmp / "out")


# --------------------------------------------------------------------------- tokenizers

BYTE_TOK = Tokenizer("byte", [chr(i) for i in range(256)], None, "\n", None)


@settings(**SETTINGS)
@given(text=TEXT)
def test_byte_round_trip(text):
    ids, oov = BYTE_TOK.encode(text)
    assert oov == 0 and ids.dtype == np.int64 and list(ids) == list(text.encode())
    assert BYTE_TOK.decode(ids) == text


@settings(**SETTINGS)
@given(alphabet=st.sets(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20), data=st.data())
def test_char_round_trip_and_unk(alphabet, data):
    vocab = ["<unk>", *sorted(alphabet - {"<unk>"})]
    tok = Tokenizer("char", vocab, None, None, "<unk>")
    known = data.draw(st.text(st.sampled_from(vocab[1:]), max_size=30))
    ids, oov = tok.encode(known)
    assert oov == 0 and tok.decode(ids) == known
    text = data.draw(TEXT)
    ids, mask = tok.encode_oov(text)
    assert len(ids) == len(text) and mask.tolist() == [c not in alphabet for c in text]
    assert all(ids[mask] == 0)


SPACE = st.sampled_from([" ", "  ", "\t", " \x0b", "\u3000", "\xa0"])


@settings(**SETTINGS)
@given(words=st.lists(st.sampled_from(WORDS[2:] + ["zz", "b\u00e9"]), max_size=12), data=st.data())
def test_word_split_invariants(words, data):
    tok = Tokenizer("word", WORDS, None, "<eos>", "<unk>")
    text = data.draw(SPACE) if data.draw(st.booleans()) else ""
    for w in words:
        text += w + data.draw(SPACE)
    ids, mask = tok.encode_oov(text)
    assert len(ids) == len(text.split()) == len(words)
    assert mask.tolist() == [w not in WORDS for w in words]
    assert tok.decode(ids) == " ".join(w if w in WORDS else "<unk>" for w in words)


# --------------------------------------------------------------------------- the text reader

LINES = st.lists(st.text(st.sampled_from("ab \t\u00e9\u4e2d\U0001f600\x00"), max_size=30), max_size=6)


@settings(**SETTINGS)
@given(lines=LINES, crlf=st.booleans(), last_newline=st.booleans(), max_piece=st.integers(4, 12),
       word_cut=st.booleans())
def test_read_pieces_keeps_lines_and_words(lines, crlf, last_newline, max_piece, word_cut):
    nl = "\r\n" if crlf else "\n"
    raw = nl.join(lines) + (nl if last_newline and lines else "")
    want = raw.split(nl)
    if raw == "" or raw.endswith(nl):  # a final newline ends the last line; it does not start another
        want.pop()
    got: list[list[str]] = []
    for p in read_pieces(io.BytesIO(raw.encode()), "t", max_piece=max_piece, word_cut=word_cut):
        if p.first:
            got.append([])
        assert p.line == len(got) and (p.first or got[-1])
        got[-1].append(p.text)
    assert ["".join(g) for g in got] == want
    if word_cut:  # no word straddles two pieces
        for g, line in zip(got, want):
            assert [w for piece in g for w in piece.split()] == line.split()


# --------------------------------------------------------------------------- scoring

def reference_line_log_probs(model: Model, ids: list[int]) -> np.ndarray:
    """log P(ids[k] | ids[:k]) for k >= 1 in float64 NumPy, from the model's own tensors (one LSTM layer)."""
    d = model.layers[0].dirs[0]
    h = np.zeros((1, model.layers[0].out))
    c = np.zeros((1, model.layers[0].hidden))
    out = []
    for a, b in zip(ids[:-1], ids[1:]):
        x = np.asarray(model.embedding[a], np.float64)[None]
        c, h = naive.lstm_step(x @ np.asarray(d.w_ih, np.float64).T, h @ np.asarray(d.w_hh, np.float64).T,
                               np.asarray(d.bias, np.float64), np.zeros((3, c.shape[1])), None, False, c)
        logits = h @ np.asarray(model.head_w, np.float64).T + model.head_b
        out.append(naive.log_softmax(logits)[0, b])
    return np.array(out)


SCORE_LINES = st.lists(st.text(st.sampled_from("ab c\u00e9"), max_size=25), min_size=1, max_size=8)


@settings(**SETTINGS)
@given(lines=SCORE_LINES, batch=st.integers(1, 9), mode=st.sampled_from(scoring.MODES))
def test_scores_are_sums_and_match_numpy(loaded, lines, batch, mode):
    model = loaded["byte"]
    r = model.score(lines, mode=mode, batch_size=batch, per_token=True)
    assert r.line_count == len(lines) and [ls.line for ls in r.lines] == list(range(1, len(lines) + 1))
    for ls in r.lines:
        assert ls.tokens == len(ls.token_log_probs)
        assert ls.log_prob == pytest.approx(sum(ls.token_log_probs), abs=1e-4)
    assert r.log_prob == pytest.approx(sum(ls.log_prob for ls in r.lines), abs=1e-4)
    assert r.tokens == sum(ls.tokens for ls in r.lines)
    eos = ord("\n")
    if mode == "sentences":
        ref = [reference_line_log_probs(model, [eos, *s.encode(), eos]) for s in lines]
    else:  # one stream: start symbol once, then every line and its eos
        seq = [eos] + [b for s in lines for b in [*s.encode(), eos]]
        flat = reference_line_log_probs(model, seq)
        ref, k = [], 0
        for s in lines:
            n = len(s.encode()) + 1
            ref.append(flat[k:k + n])
            k += n
    for ls, want in zip(r.lines, ref):
        np.testing.assert_allclose(ls.token_log_probs, want, atol=2e-5, rtol=1e-4)


@settings(**SETTINGS)
@given(lines=SCORE_LINES, batch=st.integers(1, 9), block=st.integers(1, 40), chunk=st.integers(1, 7),
       piece=st.integers(4, 9), kind=st.sampled_from(["byte", "word"]), mode=st.sampled_from(scoring.MODES))
def test_scores_do_not_depend_on_schedule(loaded, lines, batch, block, chunk, piece, kind, mode):
    """Batch size, block token budget, stream chunk and read-piece size only change how the work is cut."""
    model = loaded[kind]
    text = "".join(s + "\n" for s in lines)

    def run(batch_size, max_piece):
        scorer = scoring.Scorer(model, mode, batch_size, per_token=True)
        pieces = read_pieces(io.BytesIO(text.encode()), "t", max_piece=max_piece, word_cut=scorer.word_cut)
        return list(scorer.score(pieces, "t"))

    base = run(64, 1 << 20)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "BLOCK_TOKENS", block)
        mp.setattr(scoring, "STREAM_CHUNK", chunk)
        cut = run(batch, piece)
    assert [(ls.line, ls.tokens, ls.oov, ls.words) for ls in cut] == [(ls.line, ls.tokens, ls.oov, ls.words)
                                                                      for ls in base]
    for a, b in zip(cut, base):
        assert a.token_texts == b.token_texts
        np.testing.assert_allclose(a.token_log_probs, b.token_log_probs, atol=2e-5, rtol=1e-4)
