"""Train the bundled byte-level LSTM language model on ../shared/corpora.

Reproducible: fixed seeds, a fixed number of steps, the validation split is the last
5% of every corpus file. Saves a word_language_model-style PyTorch state_dict
(encoder / rnn / decoder) plus a JSON report; `lstm-infer convert` turns it into the
packaged model directory (see training/README.md for the exact commands).

    python training/train_bundled.py --corpora ../shared/corpora --out training/out
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

CORPORA = ("shakespeare.txt", "fortunes.txt", "jargon.txt", "lee_news.txt")
VAL_FRACTION = 0.05


class ByteLM(nn.Module):
    """Embedding -> LSTM -> Linear, named as pytorch/examples word_language_model."""

    def __init__(self, emb: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(256, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden, 256)

    def forward(self, x: torch.Tensor, state=None):
        out, state = self.rnn(self.drop(self.encoder(x)), state)
        return self.decoder(self.drop(out)), state


def load_splits(corpora: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    train, val = [], {}
    for name in CORPORA:
        data = np.frombuffer((corpora / name).read_bytes(), dtype=np.uint8)
        cut = int(len(data) * (1 - VAL_FRACTION))
        # Cut at a line boundary so validation text starts a fresh line.
        cut = int(np.flatnonzero(data[:cut] == 10)[-1]) + 1
        train.append(data[:cut])
        val[name] = data[cut:]
    return np.concatenate(train), val


@torch.no_grad()
def bits_per_byte(model: ByteLM, data: np.ndarray, chunk: int = 4096) -> float:
    """Stream the text through the model, state carried, first byte conditioned on '\\n'."""
    model.eval()
    ids = torch.from_numpy(np.concatenate([[10], data]).astype(np.int64))
    state, total = None, 0.0
    for s in range(0, len(ids) - 1, chunk):
        x = ids[s : s + chunk].unsqueeze(1)
        y = ids[s + 1 : s + chunk + 1]
        x = x[: len(y)]
        logits, state = model(x, state)
        total += nn.functional.cross_entropy(logits[:, 0], y, reduction="sum").item()
    model.train()
    return total / (len(ids) - 1) / math.log(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", type=Path, default=Path("../shared/corpora"))
    ap.add_argument("--out", type=Path, default=Path("training/out"))
    ap.add_argument("--emb", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bptt", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--reset-prob", type=float, default=0.2,
                    help="chance that a stream's state is zeroed between segments, so the model "
                         "also learns to start from a fresh state (sentences-mode scoring)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    train, val = load_splits(args.corpora)
    model = ByteLM(args.emb, args.hidden, args.layers, args.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.05)

    # Each of `batch` streams reads its own contiguous region of the training bytes.
    span = len(train) // args.batch
    starts = np.arange(args.batch) * span + rng.integers(0, args.bptt, args.batch)
    pos = np.zeros(args.batch, dtype=np.int64)
    state = None
    t0, seen, log = time.time(), 0, []
    for step in range(1, args.steps + 1):
        idx = (starts[:, None] + (pos[:, None] + np.arange(args.bptt + 1))) % len(train)
        seg = torch.from_numpy(train[idx].T.astype(np.int64))  # (bptt + 1, batch)
        pos += args.bptt
        if state is not None:
            keep = torch.from_numpy((rng.random(args.batch) >= args.reset_prob).astype(np.float32))
            state = tuple((s * keep[None, :, None]).detach() for s in state)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits, state = model(seg[:-1], state)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, 256), seg[1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seen += args.bptt * args.batch
        if step % 100 == 0 or step == args.steps:
            rate = seen / (time.time() - t0)
            bpc = loss.item() / math.log(2)
            print(f"step {step}/{args.steps} train {bpc:.3f} bits/byte  {rate:,.0f} bytes/s", flush=True)
            log.append({"step": step, "train_bits_per_byte": round(bpc, 4)})

    model = model.float()
    report = {"val_bits_per_byte": {k: round(bits_per_byte(model, v), 4) for k, v in val.items()}}
    all_val = np.concatenate(list(val.values()))
    report["val_bits_per_byte_all"] = round(bits_per_byte(model, all_val), 4)
    report.update(args=vars(args) | {"corpora": str(args.corpora), "out": str(args.out)},
                  train_bytes=int(len(train)), seconds=round(time.time() - t0, 1), log=log)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "bundled.pt")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["val_bits_per_byte"]), report["val_bits_per_byte_all"])


if __name__ == "__main__":
    main()
