"""The model directory, format v1: ``config.json`` + one float32 ``.npy`` per tensor + ``vocab.json``.

Tensors are stored in the layout the kernels use, so loading is a memory map and nothing else.
Gate order inside every recurrent matrix is the engine's own, whatever the source:

    lstm: i, f, g, o      gru: r, z, n      rnn: (one block)

Per layer ``l`` and direction ``d`` (``fw``; ``bw`` for reverse or the second half of bidirectional):

    layers.{l}.{d}.w_ih      (G*H, I)      input weights (the next layer's I is D * H_out)
    layers.{l}.{d}.w_hh      (G*H, H_out)  recurrent weights; H_out = proj_size or hidden_size
    layers.{l}.{d}.bias      (G*H,)        b_ih + b_hh summed (GRU with linear_before_reset: n keeps b_in)
    layers.{l}.{d}.b_hn      (H,)          GRU only: recurrent bias of n (zeros unless linear_before_reset)
    layers.{l}.{d}.peephole  (3, H)        LSTM with peepholes: rows i, f, o
    layers.{l}.{d}.w_hr      (P, H)        LSTM with proj_size P
    embedding                (V, E)
    head.weight              (K, F)        absent when tied to the embedding
    head.bias                (K,)

docs/format.md is the user-facing description; this module is the one that enforces it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LstmInferError

FORMAT_NAME = "lstm-infer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"

CELLS = {"lstm": 4, "gru": 3, "rnn": 1}  # gates per cell
DIRECTIONS = {"forward": ("fw",), "reverse": ("bw",), "bidirectional": ("fw", "bw")}
TOKENIZERS = ("word", "char", "byte")
# ONNX activation names (lower-case) -> kernel code, default (alpha, beta) as in onnxruntime.
ACTIVATIONS = {
    "sigmoid": (0, 0.0, 0.0), "tanh": (1, 0.0, 0.0), "relu": (2, 0.0, 0.0),
    "hardsigmoid": (3, 0.2, 0.5), "leakyrelu": (4, 0.01, 0.0), "thresholdedrelu": (5, 1.0, 0.0),
    "scaledtanh": (6, 1.0, 1.0), "affine": (7, 1.0, 0.0), "elu": (8, 1.0, 0.0),
    "softsign": (9, 0.0, 0.0), "softplus": (10, 0.0, 0.0),
}
DEFAULT_ACTIVATIONS = {"lstm": ("sigmoid", "tanh", "tanh"), "gru": ("sigmoid", "tanh"), "rnn": ("tanh",)}

# Refuse configs whose sizes could not be real before anything is allocated or mapped.
MAX_DIM = 1 << 22
MAX_LAYERS = 256
MAX_PARAMS = 1 << 33


def activation(name: str, alpha: float | None = None, beta: float | None = None) -> dict:
    """An activation entry with ONNX's default alpha/beta filled in."""
    key = name.lower()
    if key not in ACTIVATIONS:
        raise LstmInferError(f"unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
    _, a, b = ACTIVATIONS[key]
    return {"name": key, "alpha": float(a if alpha is None else alpha),
            "beta": float(b if beta is None else beta)}


def layer_config(cell: str, input_size: int, hidden_size: int, *, proj_size: int = 0,
                 direction: str = "forward", peepholes: bool = False,
                 activations: list[list[dict]] | None = None, clip: float | None = None,
                 input_forget: bool = False, linear_before_reset: bool = False,
                 nonlinearity: str = "tanh") -> dict:
    """One recurrent layer's config entry; activations default to ONNX's per cell type.

    ``activations`` holds one list per direction. For ``rnn`` the nonlinearity sets the default.
    """
    if activations is None:
        names = ("relu",) if cell == "rnn" and nonlinearity == "relu" else DEFAULT_ACTIVATIONS[cell]
        activations = [[activation(n) for n in names] for _ in DIRECTIONS[direction]]
    return {"cell": cell, "input_size": int(input_size), "hidden_size": int(hidden_size),
            "proj_size": int(proj_size), "direction": direction, "peepholes": bool(peepholes),
            "activations": activations, "clip": None if clip is None else float(clip),
            "input_forget": bool(input_forget), "linear_before_reset": bool(linear_before_reset)}


def make_config(layers: list[dict], *, embedding: dict | None = None, head: dict | None = None,
                tokenizer: dict | None = None, provenance: dict | None = None) -> dict:
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "embedding": embedding,
            "layers": layers, "head": head, "tokenizer": tokenizer, "provenance": provenance or {}}


def layer_output_size(layer: dict) -> int:
    """Features one layer emits per step: D * H_out."""
    return len(DIRECTIONS[layer["direction"]]) * (layer["proj_size"] or layer["hidden_size"])


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor file the config calls for, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    if config["embedding"]:
        emb = config["embedding"]
        shapes["embedding"] = (emb["vocab_size"], emb["dim"])
    for li, layer in enumerate(config["layers"]):
        g, h, p = CELLS[layer["cell"]], layer["hidden_size"], layer["proj_size"]
        for d in DIRECTIONS[layer["direction"]]:
            pre = f"layers.{li}.{d}."
            shapes[pre + "w_ih"] = (g * h, layer["input_size"])
            shapes[pre + "w_hh"] = (g * h, p or h)
            shapes[pre + "bias"] = (g * h,)
            if layer["cell"] == "gru":
                shapes[pre + "b_hn"] = (h,)
            if layer["peepholes"]:
                shapes[pre + "peephole"] = (3, h)
            if p:
                shapes[pre + "w_hr"] = (p, h)
    head = config["head"]
    if head:
        if not head["tied"]:
            shapes["head.weight"] = (head["output_size"], head["input_size"])
        if head["bias"]:
            shapes["head.bias"] = (head["output_size"],)
    return shapes


# --------------------------------------------------------------------------- validation

def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise LstmInferError(f"{where}: {msg}")


def _int(d: dict, key: str, where: str, lo: int = 1) -> int:
    v = d.get(key)
    _need(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= MAX_DIM, where,
          f"'{key}' must be an integer in [{lo}, {MAX_DIM}], got {v!r}")
    return v


def validate_config(config: Any, where: str = CONFIG_FILE) -> dict:
    """Check a config's structure and sizes; returns it unchanged. Raises one-line errors."""
    _need(isinstance(config, dict), where, "must hold a JSON object")
    _need(config.get("format") == FORMAT_NAME, where,
          f"not an lstm-infer model (format is {config.get('format')!r})")
    ver = config.get("format_version")
    _need(ver == FORMAT_VERSION, where,
          f"format_version {ver!r} is not supported (this lstm-infer reads version {FORMAT_VERSION})")
    for key in ("embedding", "layers", "head", "tokenizer", "provenance"):
        _need(key in config, where, f"missing key '{key}'")
    layers = config["layers"]
    _need(isinstance(layers, list) and 0 < len(layers) <= MAX_LAYERS, where,
          f"'layers' must be a list of 1 to {MAX_LAYERS} layers")
    params = 0
    emb = config["embedding"]
    prev = None
    if emb is not None:
        _need(isinstance(emb, dict), where, "'embedding' must be an object or null")
        v, e = _int(emb, "vocab_size", where + " embedding"), _int(emb, "dim", where + " embedding")
        params += v * e
        prev = e
    for li, layer in enumerate(layers):
        lw = f"{where} layer {li}"
        _need(isinstance(layer, dict), lw, "must be an object")
        cell = layer.get("cell")
        _need(isinstance(cell, str) and cell in CELLS, lw, f"cell {cell!r} is not one of {', '.join(CELLS)}")
        i, h = _int(layer, "input_size", lw), _int(layer, "hidden_size", lw)
        p = _int(layer, "proj_size", lw, lo=0)
        _need(p == 0 or (cell == "lstm" and p < h), lw, "proj_size needs an lstm cell and must be < hidden_size")
        _need(isinstance(layer.get("direction"), str) and layer["direction"] in DIRECTIONS, lw,
              f"direction {layer.get('direction')!r} is not one of {', '.join(DIRECTIONS)}")
        _need(prev is None or i == prev, lw, f"input_size {i} does not match the previous output size {prev}")
        for flag in ("peepholes", "input_forget", "linear_before_reset"):
            _need(isinstance(layer.get(flag), bool), lw, f"'{flag}' must be true or false")
        _need(not layer["peepholes"] or cell == "lstm", lw, "peepholes need an lstm cell")
        _need(not layer["input_forget"] or cell == "lstm", lw, "input_forget needs an lstm cell")
        _need(not layer["linear_before_reset"] or cell == "gru", lw, "linear_before_reset needs a gru cell")
        _need("clip" in layer, lw, "missing key 'clip'")
        clip = layer["clip"]
        _need(clip is None or (isinstance(clip, (int, float)) and not isinstance(clip, bool)
                               and math.isfinite(clip) and clip > 0), lw, "'clip' must be null or a positive number")
        acts = layer.get("activations")
        nd, na = len(DIRECTIONS[layer["direction"]]), len(DEFAULT_ACTIVATIONS[cell])
        _need(isinstance(acts, list) and len(acts) == nd
              and all(isinstance(a, list) and len(a) == na for a in acts), lw,
              f"'activations' must hold {nd} list(s) of {na} activation(s)")
        for a in (x for per_dir in acts for x in per_dir):
            _need(isinstance(a, dict) and isinstance(a.get("name"), str) and a["name"] in ACTIVATIONS, lw,
                  f"unknown activation {a!r}")
            _need(all(isinstance(a.get(k), (int, float)) and math.isfinite(a[k]) for k in ("alpha", "beta")),
                  lw, f"activation {a['name']} needs finite alpha and beta")
        g = CELLS[cell]
        params += nd * (g * h * (i + (p or h) + 1) + (p * h if p else 0))
        prev = nd * (p or h)
    head = config["head"]
    if head is not None:
        hw = where + " head"
        _need(isinstance(head, dict), hw, "must be an object or null")
        k, f = _int(head, "output_size", hw), _int(head, "input_size", hw)
        _need(f == prev, hw, f"input_size {f} does not match the last layer's output size {prev}")
        _need(isinstance(head.get("tied"), bool) and isinstance(head.get("bias"), bool), hw,
              "'tied' and 'bias' must be true or false")
        if head["tied"]:
            _need(emb is not None and emb["vocab_size"] == k and emb["dim"] == f, hw,
                  "a tied head needs an embedding of shape (output_size, input_size)")
        params += k * f + k
    _need(params <= MAX_PARAMS, where, f"{params:,} parameters is more than this engine accepts")
    tok = config["tokenizer"]
    if tok is not None:
        tw = where + " tokenizer"
        _need(isinstance(tok, dict) and tok.get("kind") in TOKENIZERS, tw,
              f"kind must be one of {', '.join(TOKENIZERS)}")
        _need(emb is not None, tw, "a tokenizer needs an embedding")
        for key in ("bos", "eos", "unk"):
            _need(tok.get(key) is None or isinstance(tok.get(key), str), tw, f"'{key}' must be a string or null")
    _need(isinstance(config["provenance"], dict), where, "'provenance' must be an object")
    return config


def validate_vocab(vocab: Any, config: dict, where: str = VOCAB_FILE) -> list[str]:
    _need(isinstance(vocab, list) and all(isinstance(t, str) for t in vocab), where,
          "must be a JSON list of token strings")
    size = config["embedding"]["vocab_size"]
    _need(len(vocab) == size, where, f"has {len(vocab)} tokens but the embedding has {size} rows")
    _need(len(set(vocab)) == len(vocab), where, "has duplicate tokens")
    tok = config["tokenizer"]
    if tok["kind"] == "byte":
        _need(size >= 256 and all(vocab[i] == chr(i) for i in range(256)), where,
              "a byte tokenizer's first 256 tokens must be the bytes 0..255 (as chr(i))")
    known = set(vocab)
    for key in ("bos", "eos", "unk"):
        _need(tok.get(key) is None or tok[key] in known, where,
              f"{key} token {tok.get(key)!r} is not in the vocabulary")
    return vocab


# --------------------------------------------------------------------------- read / write

def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _load_tensor(path: Path, name: str, shape: tuple[int, ...], check_finite: bool) -> np.ndarray:
    where = str(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise LstmInferError(f"{where}: missing tensor file for '{name}'") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # a file starting "PK" is taken for .npz
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LstmInferError(f"{where}: not a readable .npy file ({msg})") from None
    _need(isinstance(arr, np.ndarray), where, "not a .npy array")
    _need(arr.dtype == np.dtype("<f4"), where, f"dtype is {arr.dtype.str}, expected little-endian float32 (<f4)")
    _need(arr.shape == shape, where, f"shape is {arr.shape}, config.json calls for {shape}")
    _need(arr.flags.c_contiguous, where, "is stored in Fortran order; expected C order")
    if check_finite:
        flat = arr.reshape(-1)
        for s in range(0, flat.size, 1 << 22):
            _need(bool(np.isfinite(flat[s:s + (1 << 22)]).all()), where, "holds NaN or Inf values")
    return arr


def read_model(path: str | os.PathLike, check_finite: bool = True
               ) -> tuple[dict, dict[str, np.ndarray], list[str] | None]:
    """Map a model directory: (config, tensors as read-only memmaps, vocab or None)."""
    root = Path(path)
    _need(root.is_dir(), str(root), "is not a model directory (not found or not a folder)")
    cfg_path = root / CONFIG_FILE
    _need(cfg_path.is_file(), str(cfg_path), "missing: not a model directory")
    _need(_inside(cfg_path, root), str(cfg_path), "is a link leading out of the model directory")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser's stack
        raise LstmInferError(f"{cfg_path}: not valid JSON ({str(err).splitlines()[0]})") from None
    validate_config(config, str(cfg_path))
    shapes = expected_tensors(config)
    present = {p.name[:-4] for p in root.glob("*.npy")}
    extra = sorted(present - set(shapes))
    _need(not extra, str(root / (extra[0] + ".npy") if extra else root),
          "unexpected tensor file (config.json does not call for it)")
    tensors = {}
    for name, shape in shapes.items():
        file = root / f"{name}.npy"
        _need(not file.exists() or _inside(file, root), str(file), "is a link leading out of the model directory")
        # A FIFO or device would block or stream forever in np.load.
        _need(not file.exists() or file.is_file(), str(file), "is not a regular file")
        tensors[name] = _load_tensor(file, name, shape, check_finite)
    vocab = None
    if config["tokenizer"] is not None:
        vpath = root / VOCAB_FILE
        _need(vpath.is_file(), str(vpath), "missing: the tokenizer needs a vocabulary")
        _need(_inside(vpath, root), str(vpath), "is a link leading out of the model directory")
        try:
            vocab = json.loads(vpath.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:
            raise LstmInferError(f"{vpath}: not valid JSON ({str(err).splitlines()[0]})") from None
        validate_vocab(vocab, config, str(vpath))
    return config, tensors, vocab


def write_model(path: str | os.PathLike, config: dict, tensors: dict[str, np.ndarray],
                vocab: list[str] | None = None, *, force: bool = False) -> Path:
    """Validate and write a model directory atomically: a temporary folder, then one rename.

    On any error nothing is left at ``path``; an existing ``path`` is replaced only with ``force``.
    """
    out = Path(path)
    if out.exists() and not force:
        raise LstmInferError(f"{out}: already exists (use --force to replace it)")
    validate_config(config, f"{out}/{CONFIG_FILE}")
    shapes = expected_tensors(config)
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    _need(not missing and not extra, str(out),
          f"tensors do not match the config (missing: {missing or '-'}, unexpected: {extra or '-'})")
    if config["tokenizer"] is not None:
        _need(vocab is not None, str(out), "a tokenizer needs a vocabulary")
        validate_vocab(vocab, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, shape in shapes.items():
            arr = np.ascontiguousarray(tensors[name], dtype="<f4")
            _need(arr.shape == shape, name, f"shape is {arr.shape}, the config calls for {shape}")
            _need(bool(np.isfinite(arr).all()), name, "holds NaN or Inf values")
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
        if vocab is not None:
            (tmp / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
