"""Scoring against PyTorch log-probs on the same model: both modes, per line, OOVs, chunking, CLI, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

from lstm_infer import scoring, textio  # noqa: E402
from lstm_infer.cli import main  # noqa: E402
from lstm_infer.errors import LstmInferError  # noqa: E402
from tests.util import engine_from_torch, scramble  # noqa: E402

BYTE_TOK = {"kind": "byte", "eos": "\n", "bos": None, "unk": None}
WORDS = ["<eos>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "é"]
WORD_TOK = {"kind": "word", "eos": "<eos>", "bos": None, "unk": "<unk>"}
TEXT = "the cat sat\non a mat\n\na dog ran é\n  spaced   out  \nlast line no newline"


def lm(V, seed, cell="lstm", E=8, H=16, layers=2):
    torch.manual_seed(seed)
    ctor = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
    mods = nn.Embedding(V, E), ctor(E, H, layers), nn.Linear(H, V)
    for m in mods:
        scramble(m, seed, 0.5)
    return mods


@pytest.fixture(scope="module")
def byte_lm(tmp_path_factory):
    mods = lm(256, 3)
    model = engine_from_torch(mods[1], "lstm", tmp_path_factory.mktemp("b"), embedding=mods[0], head=mods[2],
                              vocab=[chr(i) for i in range(256)], tokenizer=BYTE_TOK)
    return model, mods


@pytest.fixture(scope="module")
def word_lm(tmp_path_factory):
    mods = lm(len(WORDS), 4, cell="gru", layers=1)
    model = engine_from_torch(mods[1], "gru", tmp_path_factory.mktemp("w"), embedding=mods[0], head=mods[2],
                              vocab=WORDS, tokenizer=WORD_TOK)
    return model, mods


def torch_seq_lp(mods, ids):
    """Per-token log P(ids[k] | ids[:k]) for k >= 1, float64."""
    emb, rnn, head = mods
    x = torch.tensor(ids)[:, None]
    with torch.no_grad():
        out, _ = rnn(emb(x[:-1]))
        lp = torch.log_softmax(head(out).double(), -1)
    return lp[torch.arange(len(ids) - 1), 0, x[1:, 0]].numpy()


def byte_ids(line):
    return list(line.encode())


def word_ids(line):
    return [WORDS.index(w) if w in WORDS else 1 for w in line.split()]


def test_sentences_mode_matches_torch(byte_lm):
    model, mods = byte_lm
    r = model.score(TEXT, per_token=True)
    lines = TEXT.split("\n")
    assert [ls.line for ls in r.lines] == list(range(1, len(lines) + 1))
    total = 0.0
    for ls, line in zip(r.lines, lines):
        ref = torch_seq_lp(mods, [10] + byte_ids(line) + [10])
        assert ls.tokens == len(ref) == len(line.encode()) + 1
        assert ls.log_prob == pytest.approx(ref.sum(), abs=1e-4)
        np.testing.assert_allclose(ls.token_log_probs, ref, atol=2e-5)
        assert sum(ls.token_log_probs) == pytest.approx(ls.log_prob, abs=1e-6)
        total += ref.sum()
    assert r.log_prob == pytest.approx(total, abs=1e-3)
    assert r.tokens == sum(ls.tokens for ls in r.lines)
    assert r.perplexity == pytest.approx(math.exp(-total / r.tokens), rel=1e-5)
    # Empty line: one token, P(eos | start).
    assert r.lines[2].tokens == 1


def test_stream_mode_matches_torch(byte_lm, monkeypatch):
    model, mods = byte_lm
    ref = torch_seq_lp(mods, [10] + list((TEXT + "\n").encode()))
    r = model.score(TEXT, mode="stream")
    assert r.tokens == len(ref)
    assert r.log_prob == pytest.approx(ref.sum(), abs=1e-3)
    # Small chunks: the carried state and carried last token give the same numbers.
    monkeypatch.setattr(scoring, "STREAM_CHUNK", 5)
    r2 = model.score(TEXT, mode="stream")
    assert r2.log_prob == pytest.approx(r.log_prob, abs=1e-4)
    assert [ls.log_prob for ls in r2.lines] == pytest.approx([ls.log_prob for ls in r.lines], abs=1e-5)


def test_word_model_oov_and_exclusion(word_lm):
    model, mods = word_lm
    r = model.score(["the cat sat on a zebra", "dog ran", "unknown words here"], per_token=True)
    refs = [torch_seq_lp(mods, [0] + word_ids(s) + [0]) for s in ["the cat sat on a zebra", "dog ran",
                                                                   "unknown words here"]]
    assert [ls.oov for ls in r.lines] == [1, 0, 3]
    assert r.oov == 4
    assert r.tokens == sum(len(x) for x in refs) == 7 + 3 + 4
    oov_lp = refs[0][5] + refs[2][:3].sum()
    assert r.oov_log_prob == pytest.approx(oov_lp, abs=1e-4)
    excl = math.exp(-(sum(x.sum() for x in refs) - oov_lp) / (r.tokens - r.oov))
    assert r.perplexity_excl_oov == pytest.approx(excl, rel=1e-5)
    assert r.lines[0].token_oov == [False] * 5 + [True, False]
    assert r.words == 6 + 2 + 3 + 3  # words + one eos per line


def test_batching_order_and_batch_size_invariance(byte_lm):
    model, _ = byte_lm
    rng = np.random.default_rng(0)
    lines = ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(0, 40))) for _ in range(50)]
    a = model.score(lines, batch_size=7)
    b = model.score(lines, batch_size=1)
    assert [ls.line for ls in a.lines] == list(range(1, 51))
    np.testing.assert_allclose([ls.log_prob for ls in a.lines], [ls.log_prob for ls in b.lines], atol=1e-4)
    assert [ls.tokens for ls in a.lines] == [len(s) + 1 for s in lines]


def test_long_lines_in_pieces_equal_whole(byte_lm, word_lm, monkeypatch):
    for model, text in ((byte_lm[0], "é" * 40 + " abc " * 30 + "\nshort\n"),
                        (word_lm[0], " ".join(["the cat", "sat", "on a mat"] * 20) + "\ndog\n")):
        whole = model.score(text, per_token=True)
        monkeypatch.setattr(textio, "MAX_PIECE", 16)
        monkeypatch.setattr(scoring, "STREAM_CHUNK", 7)
        pieces = scoring.score_text(model, text, per_token=True)
        monkeypatch.undo()
        assert [ls.tokens for ls in pieces.lines] == [ls.tokens for ls in whole.lines]
        assert [ls.words for ls in pieces.lines] == [ls.words for ls in whole.lines]
        np.testing.assert_allclose(pieces.lines[0].token_log_probs, whole.lines[0].token_log_probs, atol=2e-5)


def test_read_pieces_cuts_safely():
    import io

    text = "ab é€😀 word word\r\nnext"
    got = list(textio.read_pieces(io.BytesIO(text.encode()), "x", max_piece=3))
    assert "".join(p.text for p in got if p.line == 1) == "ab é€😀 word word"
    assert "".join(p.text for p in got if p.line == 2) == "next" and got[-1].last
    words = list(textio.read_pieces(io.BytesIO(b"one two three four\n"), "x", max_piece=6, word_cut=True))
    assert all(p.text.endswith(" ") for p in words[:-1]) and words[-1].last


def test_empty_input_is_defined(byte_lm):
    r = byte_lm[0].score("")
    assert r.tokens == 0 and r.perplexity is None and r.line_count == 0


def test_scorer_rejects_bad_options(byte_lm):
    with pytest.raises(LstmInferError, match="mode"):
        byte_lm[0].score("x", mode="paragraphs")
    with pytest.raises(LstmInferError, match="batch size"):
        byte_lm[0].score("x", batch_size=0)


# ------------------------------------------------------------------ CLI

def run_cli(args, input=None):
    return CliRunner().invoke(main, args, input=input)


def test_cli_json_per_token_equals_api(byte_lm, tmp_path):
    model, _ = byte_lm
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    # --jit: the API's engine (a file this small would take the NumPy steps, equal only to float32 rounding)
    res = run_cli(["score", str(f), "-m", str(model.path), "--format", "json", "--per-token", "--jit"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    api = model.score(TEXT)
    for key in ("tokens", "oov", "log_prob", "perplexity", "perplexity_excl_oov", "words"):
        assert d[key] == pytest.approx(getattr(api, key), rel=1e-9), key
    assert [ln["line"] for ln in d["lines"]] == list(range(1, 7))
    assert sum(ln["log_prob"] for ln in d["lines"]) == pytest.approx(d["log_prob"], rel=1e-9)
    assert sum(t["log_prob"] for t in d["lines"][0]["token_log_probs"]) == pytest.approx(
        d["lines"][0]["log_prob"], abs=1e-5)
    # stdin equals the file, up to the source name
    res2 = run_cli(["score", "-", "-m", str(model.path), "--format", "json", "--per-token"], input=TEXT)
    d2 = json.loads(res2.stdout)
    for x in d["lines"] + d2["lines"]:
        x.pop("source")
    assert d2 == d


def test_cli_text_and_tsv(byte_lm, tmp_path):
    model, _ = byte_lm
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    res = run_cli(["score", str(f), "-m", str(model.path)])
    assert res.exit_code == 0
    assert "Perplexity including OOVs" in res.stdout and "natural log" in res.stdout
    assert "tokens/s" in res.stderr
    tsv = run_cli(["score", str(f), "-m", str(model.path), "--format", "tsv", "--per-line", "--mode", "stream"])
    rows = [r.split("\t") for r in tsv.stdout.strip().split("\n")]
    assert rows[0][:3] == ["source", "line", "tokens"] and len(rows) == 7
    api = model.score(TEXT, mode="stream")
    assert sum(float(r[4]) for r in rows[1:]) == pytest.approx(api.log_prob, abs=1e-4)


@pytest.mark.parametrize("content,args,msg", [
    (b"fine\n\xff\xfe bad\n", [], "t.txt:2: not valid UTF-8"),
    (None, [], "no such file"),
])
def test_cli_bad_input(byte_lm, tmp_path, content, args, msg):
    f = tmp_path / "t.txt"
    if content is not None:
        f.write_bytes(content)
    res = run_cli(["score", str(f), "-m", str(byte_lm[0].path), *args])
    assert res.exit_code == 1
    assert msg in res.stderr and "Traceback" not in res.output + res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_encoding_replace_and_empty(byte_lm, tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"ok\n\xff\n")
    res = run_cli(["score", str(f), "-m", str(byte_lm[0].path), "--encoding-errors", "replace", "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["tokens"] == 3 + 4  # U+FFFD is 3 bytes
    e = tmp_path / "e.txt"
    e.write_bytes(b"")
    res = run_cli(["score", str(e), "-m", str(byte_lm[0].path), "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["perplexity"] is None


def test_cli_model_without_tokenizer(tmp_path):
    mods = lm(12, 5)
    model = engine_from_torch(mods[1], "lstm", tmp_path, embedding=mods[0], head=mods[2])
    res = run_cli(["score", "-", "-m", str(model.path)], input="x\n")
    assert res.exit_code == 1 and "no tokenizer" in res.stderr
