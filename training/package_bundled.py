"""Package the trained byte-level LSTM as lstm-infer's bundled model, with our own converter.

    python training/package_bundled.py --run training/out --corpora ../shared/corpora

Writes lstm_infer/data/default (the converted model, provenance filled in from the training report) and
tests/data/heldout.txt + heldout.json: a small sample of every corpus's validation split and its bits per
byte computed by PyTorch on the checkpoint, which tests/test_bundled.py holds the engine to.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from lstm_infer.converters import convert

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "training"))
from train_bundled import CORPORA, ByteLM, load_splits  # noqa: E402

SAMPLE_BYTES = 1500  # per corpus, from the start of its validation split, cut at a line end


def heldout_sample(corpora: Path) -> bytes:
    _, val = load_splits(corpora)
    parts = []
    for name in CORPORA:
        data = bytes(val[name][: SAMPLE_BYTES * 2])
        cut = data.rfind(b"\n", 0, SAMPLE_BYTES) + 1
        parts.append(data[:cut] if cut > 0 else data[:SAMPLE_BYTES] + b"\n")
    return b"".join(parts)


@torch.no_grad()
def torch_bits_per_byte(state: dict, args: dict, text: bytes) -> float:
    """The stream the way `lstm-infer score --mode stream` reads it: '\\n' first, then every byte."""
    model = ByteLM(args["emb"], args["hidden"], args["layers"], 0.0)
    model.load_state_dict(state)
    model.eval()
    ids = torch.from_numpy(np.frombuffer(b"\n" + text, np.uint8).astype(np.int64))
    logits, _ = model(ids[:-1, None])
    nll = torch.nn.functional.cross_entropy(logits[:, 0].double(), ids[1:], reduction="sum").item()
    return nll / (len(ids) - 1) / math.log(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "training" / "out")
    ap.add_argument("--corpora", type=Path, default=ROOT.parent / "shared" / "corpora")
    ap.add_argument("--out", type=Path, default=ROOT / "lstm_infer" / "data" / "default")
    args = ap.parse_args()

    report = json.loads((args.run / "report.json").read_text())
    targs = report["args"]
    sums = dict(line.split()[::-1] for line in (args.corpora / "SHA256SUMS").read_text().splitlines() if line)
    cmd = ("python training/train_bundled.py --corpora ../shared/corpora --out training/out "
           + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in targs.items()
                      if k not in ("corpora", "out", "bf16")))
    provenance = {
        "description": "byte-level English LSTM language model bundled with lstm-infer",
        "architecture": f"Embedding(256, {targs['emb']}) -> LSTM({targs['emb']}, {targs['hidden']}) x "
                        f"{targs['layers']} -> Linear({targs['hidden']}, 256)",
        "corpora": {name: {"sha256": sums.get(name)} for name in CORPORA},
        "validation": "last 5% of every corpus file, cut at a line start; bits per byte, state carried",
        "val_bits_per_byte": report["val_bits_per_byte"],
        "val_bits_per_byte_all": report["val_bits_per_byte_all"],
        "train_bytes": report["train_bytes"],
        "train_seconds": report["seconds"],
        "training_command": cmd + " && python training/package_bundled.py",
    }
    out = convert(args.run / "bundled.pt", args.out, tokenizer="byte", eos="\n", force=True, provenance=provenance)
    print(f"wrote {out}")

    sample = heldout_sample(args.corpora)
    data = ROOT / "tests" / "data"
    data.mkdir(exist_ok=True)
    (data / "heldout.txt").write_bytes(sample)
    state = torch.load(args.run / "bundled.pt", weights_only=True, map_location="cpu")
    bpb = torch_bits_per_byte(state, targs, sample)
    (data / "heldout.json").write_text(json.dumps(
        {"bytes": len(sample), "torch_bits_per_byte": round(bpb, 6),
         "note": "stream mode: '\\n' first, every byte of heldout.txt scored; from training/package_bundled.py"},
        indent=1) + "\n")
    print(f"held-out sample: {len(sample)} bytes, {bpb:.4f} bits/byte (PyTorch)")


if __name__ == "__main__":
    main()
