"""Scoring on a Dask LocalCluster: totals equal a local run, per-line files in order, worker loss, CLI."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
distributed = pytest.importorskip("distributed")
from click.testing import CliRunner  # noqa: E402
from torch import nn  # noqa: E402

from lstm_infer import distributed as D  # noqa: E402
from lstm_infer.cli import main  # noqa: E402
from lstm_infer.errors import LstmInferError  # noqa: E402
from lstm_infer.scoring import Scorer, ScoreResult  # noqa: E402
from lstm_infer.textio import open_input, read_pieces  # noqa: E402
from tests.util import engine_from_torch, scramble  # noqa: E402

BYTE_TOK = {"kind": "byte", "eos": "\n", "bos": None, "unk": None}
# CRLF, empty lines, multi-byte characters, a line longer than the partitions, no final newline.
TRICKY = ("first line\r\nsecond é€ line\n\n\n" + "long " * 60 + "\nx\n😀 emoji\r\n\nlast without newline").encode()
PART = 97  # bytes: small, so partition boundaries fall inside lines, CRLFs and characters


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(7)
    mods = nn.Embedding(256, 8), nn.LSTM(8, 16, 2), nn.Linear(16, 256)
    for m in mods:
        scramble(m, 7, 0.5)
    model = engine_from_torch(mods[1], "lstm", tmp_path_factory.mktemp("m"), embedding=mods[0], head=mods[2],
                              vocab=[chr(i) for i in range(256)], tokenizer=BYTE_TOK)
    return model, mods


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    for k in range(2):
        lines = ["".join(chr(c) for c in rng.integers(97, 123, rng.integers(0, 70))) for _ in range(120)]
        (d / f"a{k}.txt").write_text("\n".join(lines) + "\n")
    (d / "b_tricky.txt").write_bytes(TRICKY)
    (d / "c_empty.txt").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def client():
    with D.local_cluster(2) as cluster, distributed.Client(cluster) as c:
        yield c


def local_scores(model, paths, mode="sentences"):
    """What `lstm-infer score` computes in one process: (total, per-file results with lines)."""
    scorer = Scorer(model, mode)
    total, files = ScoreResult(), []
    for path in paths:
        f, name, _ = open_input(path)
        with f:
            r = ScoreResult(lines=[])
            for ls in scorer.score(read_pieces(f, name), name):
                r.add(ls)
                total.add(ls)
        files.append((name, r))
    return total, files


def torch_line_lp(mods, line: bytes) -> float:
    """log P(line + eos | eos) from PyTorch, float64."""
    emb, rnn, head = mods
    x = torch.tensor([10, *line, 10])[:, None]
    with torch.no_grad():
        lp = torch.log_softmax(head(rnn(emb(x[:-1]))[0]).double(), -1)
    return float(lp[torch.arange(len(x) - 1), 0, x[1:, 0]].sum())


def assert_same_totals(got: ScoreResult, want: ScoreResult, rel: float = 1e-9):
    """Counts exact; log-probs to ``rel``. Not bit-exact: a line batched with different neighbours may round
    differently in float32 (BLAS), and partition sums add in another order."""
    for key in ("tokens", "oov", "words", "line_count"):
        assert getattr(got, key) == getattr(want, key), key
    for key in ("log_prob", "oov_log_prob"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=rel, abs=1e-12), key
    assert got.perplexity == (None if want.perplexity is None else pytest.approx(want.perplexity, rel=100 * rel))


# ---------------------------------------------------------------------------------------------- partitions

def test_partitions_read_every_line_once_with_its_number(tmp_path):
    """For every partition size, the partitions' pieces are the whole file's, line numbers included."""
    f = tmp_path / "t.txt"
    f.write_bytes(TRICKY)
    with open(f, "rb") as fh:
        whole = [(p.line, p.text, p.first, p.last) for p in read_pieces(fh, str(f))]
    for size in range(1, len(TRICKY) + 2):
        got = []
        for part in D.plan([(str(f), str(f), len(TRICKY))], "sentences", size):
            with open(f, "rb") as fh:
                first = 1 + TRICKY[:part.start].count(b"\n")
                got += [(p.line, p.text, p.first, p.last) for p in D.read_partition(part, first, fh)]
        assert got == whole, size
    assert len(D.plan([(str(f), str(f), len(TRICKY))], "stream", 5)) == 1


def test_parquet_writer_row_groups_round_trip(lm, tmp_path, monkeypatch):
    """A partition's Parquet file is written a row group at a time and reads back as the lines' dicts."""
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(D, "PARQUET_ROWS", 3)
    lines = lm[0].score(TRICKY.decode(), per_token=True).lines
    job = D._Job(None, {}, "sentences", 64, True, "strict", False, str(tmp_path), "parquet", 5)
    out = D._Output(job, D.Partition(7, "t", "t", 0, None))
    for ls in lines:
        out.write(ls)
    path = out.commit()
    assert path.endswith("part-00007.parquet") and os.listdir(tmp_path) == ["part-00007.parquet"]
    f = pq.ParquetFile(path)
    assert f.metadata.num_row_groups == 3
    got = f.read().to_pylist()
    want = [ls.as_dict() for ls in lines]
    assert [(r["line"], len(r["token_log_probs"])) for r in got] == [(w["line"], len(w["token_log_probs"]))
                                                                     for w in want]
    assert got[1]["token_log_probs"][0] == pytest.approx(want[1]["token_log_probs"][0])


# ---------------------------------------------------------------------------------------------- on a cluster

def test_totals_and_files_equal_local_run(lm, corpus, client):
    model, mods = lm
    paths = sorted(glob.glob(str(corpus / "*.txt")))
    want_total, want_files = local_scores(model, paths)
    r = D.score_files(str(corpus / "*.txt"), model=model.path, client=client, partition_size=PART)
    assert_same_totals(r.total, want_total)
    assert [name for name, _ in r.files] == paths
    for (_, got), (_, want) in zip(r.files, want_files):
        assert_same_totals(got, want, rel=1e-8)  # small files: one line's float32 rounding is a larger share
    assert r.files[-1][1].line_count == 0 and r.outputs == []
    # The totals are PyTorch's too.
    ref = sum(torch_line_lp(mods, line) for line in TRICKY.replace(b"\r\n", b"\n").split(b"\n"))
    assert r.files[2][1].log_prob == pytest.approx(ref, rel=1e-6)


def test_jsonl_per_line_output_in_order(lm, corpus, client, tmp_path):
    model, _ = lm
    paths = [str(corpus / "b_tricky.txt"), str(corpus / "a0.txt")]
    _, want_files = local_scores(model, paths)
    out = tmp_path / "out"
    r = D.score_files(paths, model=model.path, client=client, partition_size=PART, output=str(out),
                      per_token=True)
    assert r.outputs == sorted(glob.glob(str(out / "part-*.jsonl"))) and len(r.outputs) > len(paths)
    assert not glob.glob(str(out / ".*"))  # no temporary files left
    rows = [json.loads(s) for f in r.outputs for s in open(f, encoding="utf-8")]
    want = [ls for _, fr in want_files for ls in fr.lines]
    assert [(x["source"], x["line"], x["tokens"]) for x in rows] == [(ls.source, ls.line, ls.tokens) for ls in want]
    np.testing.assert_allclose([x["log_prob"] for x in rows], [ls.log_prob for ls in want], atol=1e-5)
    assert [t["token"] for t in rows[1]["token_log_probs"]][:3] == ["s", "e", "c"]
    with pytest.raises(LstmInferError, match="already holds part-"):
        D.score_files(paths, model=model.path, client=client, output=str(out))


def test_parquet_output_and_its_requirement(lm, corpus, client, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    model, _ = lm
    paths = [str(corpus / "a1.txt"), str(corpus / "c_empty.txt"), str(corpus / "b_tricky.txt")]
    _, want_files = local_scores(model, paths)
    r = D.score_files(paths, model=model.path, client=client, partition_size=500, output=str(tmp_path / "pq"),
                      output_format="parquet")
    tables = [pq.read_table(f) for f in r.outputs]
    assert len({t.schema for t in tables}) == 1  # the empty file's partition has the same columns
    rows = [row for t in tables for row in t.to_pylist()]
    want = [ls for _, fr in want_files for ls in fr.lines]
    assert [(x["source"], x["line"]) for x in rows] == [(ls.source, ls.line) for ls in want]
    np.testing.assert_allclose([x["log_prob"] for x in rows], [ls.log_prob for ls in want], atol=1e-5)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(LstmInferError, match="needs pyarrow"):
        D.score_files(paths, model=model.path, client=client, output=str(tmp_path / "pq2"), output_format="parquet")


def test_stream_mode_scores_each_file_as_one_stream(lm, corpus, client):
    model, _ = lm
    paths = sorted(glob.glob(str(corpus / "*.txt")))
    want_total, want_files = local_scores(model, paths, mode="stream")
    r = D.score_files(paths, model=model.path, client=client, mode="stream", partition_size=PART)
    assert_same_totals(r.total, want_total)
    for (_, got), (_, want) in zip(r.files, want_files):
        assert_same_totals(got, want, rel=1e-8)  # small files: one line's float32 rounding is a larger share


def test_errors_name_file_line_and_workers(lm, corpus, client, tmp_path):
    model, _ = lm
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n" * 40 + b"\xff oops\n" + b"more\n" * 5)
    with pytest.raises(LstmInferError, match=r"bad.txt:41: not valid UTF-8"):
        D.score_files(str(bad), model=model.path, client=client, partition_size=PART)
    with pytest.raises(LstmInferError, match="cannot load the model.*same paths on every worker"):
        D.score_files(str(bad), model=tmp_path / "nowhere", client=client)
    with pytest.raises(LstmInferError, match="matches no files"):
        D.score_files(str(tmp_path / "*.nothing"), model=model.path, client=client)
    with pytest.raises(LstmInferError, match="output format"):
        D.score_files(str(bad), model=model.path, client=client, output=str(tmp_path / "o"), output_format="csv")


def run_cli(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("per_line", [True, False])
def test_cli_scheduler_gives_the_local_json(lm, corpus, client, per_line):
    model, _ = lm
    paths = sorted(glob.glob(str(corpus / "*.txt")))
    args = ["score", *paths, "-m", str(model.path), "--format", "json", "--threads", str(max(1, D._cores() // 2))]
    args += ["--per-line"] if per_line else []
    local = run_cli(args)
    # --scheduler local starts its own cluster (cores // threads = 2 processes); the other run uses the fixture's.
    dist = run_cli(args + ["--scheduler", "local" if per_line else client.scheduler.address])
    lines, dlines = local.pop("lines", []), dist.pop("lines", [])
    assert dist.keys() == local.keys()
    for key, v in local.items():  # perplexities magnify the log-prob's rounding by |log_prob| / tokens
        rel = 1e-9 if key in ("log_prob", "oov_log_prob") else 1e-7
        assert dist[key] == (pytest.approx(v, rel=rel) if isinstance(v, float) else v), key
    assert [(x["source"], x["line"], x["tokens"]) for x in dlines] == [(x["source"], x["line"], x["tokens"])
                                                                      for x in lines]
    np.testing.assert_allclose([x["log_prob"] for x in dlines], [x["log_prob"] for x in lines], atol=1e-5)


def test_lost_worker_partition_is_recomputed(lm, corpus, client, tmp_path, monkeypatch):
    """Partition 1's first attempt kills its worker process mid-partition; Dask reruns it on another worker."""
    model, _ = lm
    paths = sorted(glob.glob(str(corpus / "*.txt")))
    want_total, _ = local_scores(model, paths)
    marker = tmp_path / "crashed"
    monkeypatch.setattr(D, "_CRASH_ONCE", (str(marker), 1))
    r = D.score_files(paths, model=model.path, client=client, partition_size=PART, output=str(tmp_path / "o"))
    assert marker.exists()  # the worker really died
    assert_same_totals(r.total, want_total)
    rows = [json.loads(s) for f in r.outputs for s in open(f, encoding="utf-8")]
    assert len(rows) == want_total.line_count  # every line written exactly once
    assert not glob.glob(str(tmp_path / "o" / ".*"))
    os.remove(marker)
