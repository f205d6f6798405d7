"""The bundled model: it ships, loads with no argument, and scores held-out text as PyTorch did."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

import lstm_infer
from lstm_infer.cli import main

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def model():
    return lstm_infer.load()


def test_bundled_model_ships_and_describes_itself(model):
    cfg = model.config
    assert cfg["tokenizer"]["kind"] == "byte" and cfg["tokenizer"]["eos"] == "\n"
    prov = cfg["provenance"]
    for key in ("corpora", "architecture", "val_bits_per_byte", "training_command"):
        assert key in prov
    size = sum(p.stat().st_size for p in Path(model.path).iterdir())
    assert size < 20e6
    res = CliRunner().invoke(main, ["info"])
    assert res.exit_code == 0 and "val_bits_per_byte" in res.stdout and "training_command" in res.stdout


def test_heldout_bits_per_byte_equal_pytorch(model):
    """The engine, converter and package data together reproduce PyTorch's number on unseen text."""
    text = (DATA / "heldout.txt").read_text(encoding="utf-8")
    rec = json.loads((DATA / "heldout.json").read_text())
    r = model.score(text, mode="stream")
    assert r.tokens == rec["bytes"]
    assert r.bits_per_token == pytest.approx(rec["torch_bits_per_byte"], abs=2e-4)
    assert r.bits_per_token < 2.5  # the quality bar: a real English model, not noise (8 bits)


def test_score_cli_with_no_model_argument(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog.\n")
    res = CliRunner().invoke(main, ["score", str(f), "--format", "json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["tokens"] == 45 and 0.5 < d["log_prob"] / -d["tokens"] / math.log(2) < 4
