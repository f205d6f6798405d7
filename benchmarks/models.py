"""Reference models for the benchmark: built in PyTorch with fixed seeds, exported to ONNX, converted by us.

Every model is word_language_model-shaped: Embedding (V, E) -> nn.LSTM (E -> H, L layers) -> Linear (H -> V),
time-major (T, B). One build (cached under the work folder, keyed by the spec and the torch version) gives:

    state.pt        the torch state_dict (the PyTorch peer loads it; the fallback converter input)
    lm.onnx         ids (T, B) -> logits (T, B, V)                       what our converter reads
    score.onnx      ids, targets (T, B) -> target log-probs (T, B)       log_softmax + gather inside the graph
    step.onnx       ids (1, B), h0, c0 (L, B, H) -> logits (1, B, V), hn, cn      greedy decoding peers
    step_lp.onnx    as step.onnx with log_softmax applied                         beam search peers
    model/          the lstm-infer model directory
    built.json      the spec and how the model directory was made

All exports use the legacy exporter (dynamo=False, opset 17) with dynamic time and batch axes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Random weights U(-s, s). Embedding and biases s = 0.6 (as tests/util.py scramble: every gate block differs);
# LSTM matrices s = 3 / sqrt(H): with s = 0.6 a 650-unit LSTM is chaotic (float32 rounding differences grow
# to whole nats within 128 steps, so no two correct engines agree), at 3 / sqrt(H) float32 stays within
# ~2e-6 of float64. Head s = 6 / sqrt(H): logits spread a few nats, so greedy argmaxes are not near-ties.
WEIGHT_SCHEME = "emb/bias U(0.6), lstm U(3/sqrt(H)), head U(6/sqrt(H))"
BUNDLED = Path(__file__).resolve().parents[1] / "lstm_infer" / "data" / "default"


@dataclass(frozen=True)
class Spec:
    name: str
    vocab: int  # V
    embed: int  # E
    hidden: int  # H
    layers: int  # L
    seed: int = 0
    tokenizer: str = "word"  # word: synthetic vocabulary w0..; byte: V = 256

    def lstm_params(self) -> list[tuple[int, int]]:
        """(input size I, hidden size H) per layer."""
        return [(self.embed if k == 0 else self.hidden, self.hidden) for k in range(self.layers)]


REFERENCE = {
    "medium": Spec("medium", 10_000, 650, 650, 2, seed=1),
    "large": Spec("large", 10_000, 650, 1500, 2, seed=2),
    "char": Spec("char", 256, 128, 512, 2, seed=3, tokenizer="byte"),
    "tiny": Spec("tiny", 50, 16, 16, 2, seed=4),  # the smoke test's model
}


def flops_per_token(spec: Spec) -> dict[str, int]:
    """Multiply-adds x 2 per token: each LSTM layer 2 * 4H * (I + H), the head 2 * H * V."""
    rnn = sum(2 * 4 * h * (i + h) for i, h in spec.lstm_params())
    head = 2 * spec.hidden * spec.vocab
    return {"rnn": rnn, "head": head, "total": rnn + head}


def weight_bytes_per_token(spec: Spec) -> int:
    """float32 bytes of weights a batch-1 decoding step must read: every LSTM matrix, the head, one embedding row."""
    rnn = sum(4 * h * (i + h) + 4 * h for i, h in spec.lstm_params())
    head = spec.hidden * spec.vocab + spec.vocab
    return 4 * (rnn + head + spec.embed)


# --------------------------------------------------------------------------- torch modules

def _torch_classes():
    """The torch modules, defined lazily so that importing this file does not import torch."""
    import torch
    from torch import nn

    class RefLM(nn.Module):
        """Embedding -> LSTM -> Linear, named as pytorch/examples word_language_model (encoder/rnn/decoder)."""

        def __init__(self, spec: Spec, head_bias: bool = True):
            super().__init__()
            self.encoder = nn.Embedding(spec.vocab, spec.embed)
            self.rnn = nn.LSTM(spec.embed, spec.hidden, spec.layers)
            self.decoder = nn.Linear(spec.hidden, spec.vocab, bias=head_bias)

        def forward(self, ids, state=None):
            out, state = self.rnn(self.encoder(ids), state)
            return self.decoder(out), state

    class Logits(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(ids)[0]

    class Score(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids, targets):
            lp = torch.log_softmax(self.lm(ids)[0], dim=-1)
            return lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    class Step(nn.Module):
        def __init__(self, lm, log_probs: bool):
            super().__init__()
            self.lm, self.log_probs = lm, log_probs

        def forward(self, ids, h0, c0):
            logits, (hn, cn) = self.lm(ids, (h0, c0))
            return (torch.log_softmax(logits, dim=-1) if self.log_probs else logits), hn, cn

    return RefLM, Logits, Score, Step


def weight_scale(name: str, spec: Spec) -> float:
    """s of U(-s, s) for one parameter (see WEIGHT_SCHEME)."""
    if name.startswith("rnn.weight"):
        return 3.0 / spec.hidden ** 0.5
    if name == "decoder.weight":
        return 6.0 / spec.hidden ** 0.5
    return 0.6


def torch_model(spec: Spec, state_path: Path | None = None, head_bias: bool = True):
    """A RefLM in eval mode: random weights from ``spec.seed`` (see WEIGHT_SCHEME), or the saved state_dict."""
    import torch

    RefLM = _torch_classes()[0]
    lm = RefLM(spec, head_bias)
    if state_path is not None:
        lm.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    else:
        g = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * weight_scale(name, spec))
    return lm.eval()


def _export(module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes)


def export_onnx(lm, spec: Spec, out: Path) -> None:
    """Write lm.onnx, score.onnx, step.onnx and step_lp.onnx for ``lm`` into ``out``."""
    import torch

    _, Logits, Score, Step = _torch_classes()
    tb = {0: "T", 1: "B"}
    ids = torch.zeros((3, 2), dtype=torch.int64)
    _export(Logits(lm), (ids,), out / "lm.onnx", ["ids"], ["logits"], {"ids": tb, "logits": tb})
    _export(Score(lm), (ids, ids), out / "score.onnx", ["ids", "targets"], ["log_probs"],
            {"ids": tb, "targets": tb, "log_probs": tb})
    h0 = torch.zeros((spec.layers, 2, spec.hidden))
    state_axes = {"ids": {1: "B"}, "h0": {1: "B"}, "c0": {1: "B"}, "hn": {1: "B"}, "cn": {1: "B"}}
    for name, lp in (("step.onnx", False), ("step_lp.onnx", True)):
        _export(Step(lm, lp), (ids[:1], h0, h0), out / name, ["ids", "h0", "c0"], ["scores", "hn", "cn"],
                {**state_axes, "scores": {1: "B"}})


# --------------------------------------------------------------------------- building and caching

def synthetic_vocab(spec: Spec) -> list[str] | None:
    """Word models get tokens <unk>, <eos>, w2, w3, ...; byte models need none (256 rows -> byte tokenizer)."""
    if spec.tokenizer == "byte":
        return None
    return ["<unk>", "<eos>"] + [f"w{i}" for i in range(2, spec.vocab)]


def _convert(spec: Spec, folder: Path) -> str:
    """Make folder/model with our converter: from lm.onnx, or from state.pt when ONNX conversion is missing."""
    from lstm_infer.converters import convert

    from lstm_infer.errors import LstmInferError

    vocab = synthetic_vocab(spec)
    try:
        convert(folder / "lm.onnx", folder / "model", vocab=vocab, force=True)
        return "onnx (lm.onnx)"
    except LstmInferError as err:
        if "not available" not in str(err):
            raise
        convert(folder / "state.pt", folder / "model", vocab=vocab, force=True)
        return "pytorch state_dict (ONNX converter not available yet)"


def build(spec: Spec, work: Path, log=print) -> dict:
    """Build (or reuse) the files of ``spec`` under work/<name>/ and return built.json's content."""
    import torch

    folder = work / spec.name
    stamp = folder / "built.json"
    key = {"spec": asdict(spec), "torch": torch.__version__, "weights": WEIGHT_SCHEME}
    if stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("key") == key and (folder / "model" / "config.json").is_file():
            return info
    log(f"building {spec.name} (V={spec.vocab} E={spec.embed} H={spec.hidden} L={spec.layers}) in {folder}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    lm = torch_model(spec)
    torch.save(lm.state_dict(), folder / "state.pt")
    export_onnx(lm, spec, folder)
    info = {"key": key, "spec": asdict(spec), "converted_from": _convert(spec, folder), "head_bias": True}
    stamp.write_text(json.dumps(info, indent=1))
    return info


def bundled_spec(where: Path = BUNDLED) -> tuple[Spec | None, str]:
    """The bundled model (or a stand-in directory) as a Spec, or None and why it cannot be benchmarked."""
    cfg_path = where / "config.json"
    if not cfg_path.is_file():
        return None, f"{where} does not exist yet"
    cfg = json.loads(cfg_path.read_text())
    layers = cfg["layers"]
    plain = all(ly["cell"] == "lstm" and ly["direction"] == "forward" and not ly["proj_size"]
                and not ly["peepholes"] and ly["clip"] is None and not ly["input_forget"]
                and [a["name"] for a in ly["activations"][0]] == ["sigmoid", "tanh", "tanh"] for ly in layers)
    hidden = {ly["hidden_size"] for ly in layers}
    if not plain or len(hidden) != 1 or cfg["embedding"] is None or cfg["head"] is None:
        return None, "the bundled model is not a plain Embedding -> LSTM -> Linear stack"
    emb = cfg["embedding"]
    kind = (cfg.get("tokenizer") or {}).get("kind", "word")
    return Spec("bundled", emb["vocab_size"], emb["dim"], hidden.pop(), len(layers), tokenizer=kind), ""


def build_bundled(spec: Spec, work: Path, log=print, where: Path = BUNDLED) -> dict:
    """Peers for the bundled model: its tensors loaded into a RefLM (engine gate order i,f,g,o is PyTorch's)."""
    import torch

    from lstm_infer.format import read_model

    folder = work / spec.name
    stamp = folder / "built.json"
    mtime = (where / "config.json").stat().st_mtime
    key = {"spec": asdict(spec), "torch": torch.__version__, "bundled": str(where), "bundled_mtime": mtime}
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return json.loads(stamp.read_text())
    log(f"building peers for the bundled model in {folder}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg, t, _ = read_model(where)
    lm = torch_model(spec, head_bias=cfg["head"]["bias"])
    with torch.no_grad():
        lm.encoder.weight.copy_(torch.from_numpy(np.array(t["embedding"])))
        for k in range(spec.layers):
            pre = f"layers.{k}.fw."
            getattr(lm.rnn, f"weight_ih_l{k}").copy_(torch.from_numpy(np.array(t[pre + "w_ih"])))
            getattr(lm.rnn, f"weight_hh_l{k}").copy_(torch.from_numpy(np.array(t[pre + "w_hh"])))
            getattr(lm.rnn, f"bias_ih_l{k}").copy_(torch.from_numpy(np.array(t[pre + "bias"])))
            getattr(lm.rnn, f"bias_hh_l{k}").zero_()
        lm.decoder.weight.copy_(torch.from_numpy(np.array(t["embedding" if cfg["head"]["tied"] else "head.weight"])))
        if cfg["head"]["bias"]:
            lm.decoder.bias.copy_(torch.from_numpy(np.array(t["head.bias"])))
    torch.save(lm.state_dict(), folder / "state.pt")
    export_onnx(lm, spec, folder)
    what = "the bundled model directory (as shipped)" if where == BUNDLED else f"{where} (standing in for it)"
    info = {"key": key, "spec": asdict(spec), "converted_from": what, "head_bias": cfg["head"]["bias"],
            "model_dir": str(where)}
    stamp.write_text(json.dumps(info, indent=1))
    return info


def model_dir(info: dict, work: Path) -> Path:
    return Path(info["model_dir"]) if "model_dir" in info else work / info["spec"]["name"] / "model"
