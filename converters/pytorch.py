"""PyTorch checkpoints -> the converter spec ``(config, tensors, vocab)``.

Reads state_dict files (zip or legacy pickle, through the weights-only unpickler), TorchScript archives and
.safetensors files, then finds the model's structure from tensor names and shapes alone:

    embedding  (V, E)            an nn.Embedding: a module holding only ``weight``, E = first input size
    recurrent  *.weight_ih_l{k}  nn.LSTM / GRU / RNN, one or several (a ModuleList), chained by size
    head       (K, F) [+ (K,)]   an nn.Linear on the last layer's output; tied when it equals the embedding

Every floating-point tensor must take one of these roles: anything left over is an error, because an engine
that skipped it would give different numbers from the original model.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lstm_infer import format as fmt
from lstm_infer.errors import LstmInferError

from . import layout
from .vocab import VOCAB_KEYS, find_vocab, parse_vocab_text

# Checkpoint dict entries that hold the model's state_dict, most common first.
NESTED_KEYS = ("model_state_dict", "state_dict", "model", "model_state", "net", "network", "module", "weights",
               "params", "state")
# TorchScript extra files that may carry the vocabulary (torch.jit.save(..., _extra_files=...)).
EXTRA_VOCAB_FILES = ("vocab.json", "vocab.txt", "itos.json", "tokens.txt")
RECURRENT = re.compile(r"^(?:(?P<prefix>.*)\.)?(?P<kind>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)"
                       r"_l(?P<layer>\d+)(?P<rev>_reverse)?$")
CELL_PARAM = re.compile(r"(^|\.)(weight_ih|weight_hh|bias_ih|bias_hh)$")  # nn.LSTMCell / GRUCell / RNNCell
# Module-name hints, used only to break ties between candidates of the right shape.
EMB_HINTS = ("emb", "encoder", "wte", "lookup", "word", "tok")
HEAD_HINTS = ("decoder", "fc", "linear", "out", "head", "proj", "classifier", "logit", "dense", "tag", "cls",
              "softmax", "score", "vocab")
GATES_TO_CELL = {4: "lstm", 3: "gru", 1: "rnn"}


def _reason(err: BaseException) -> str:
    """The first sentence of an exception's message, for a one-line error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0][:160]


# --------------------------------------------------------------------------- reading

def read_checkpoint(path: Path, kind: str) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """A checkpoint's floating-point tensors as float32 arrays, and any vocabulary stored with them."""
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "torchscript":
        return _read_torchscript(path)
    return _read_pickled(path)


def _read_pickled(path: Path) -> tuple[dict[str, np.ndarray], list[str] | None]:
    import torch

    where = str(path)
    try:
        # weights_only: the restricted unpickler rebuilds tensors and plain containers, never imports code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None and "global" not in str(err).lower():  # refused for no code: a damaged pickle
            raise LstmInferError(f"{where}: torch.load cannot read it, the file is truncated or corrupt "
                                 "(not a valid pickle)") from None
        what = f" ({found.group(1)})" if found else ""
        raise LstmInferError(
            f"{where}: holds Python objects{what} that only running their code could rebuild, which the converter "
            "refuses to do; re-save the weights as a state_dict: torch.save(model.state_dict(), path)") from None
    except Exception as err:  # torch's parsers raise many types on damaged input; none may reach the user raw
        raise LstmInferError(f"{where}: torch.load cannot read it, the file is truncated or corrupt "
                             f"({_reason(err)})") from None
    if not isinstance(obj, dict):
        raise LstmInferError(f"{where}: holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    state, rest = _find_state_dict(obj, where)
    return _as_arrays(state, where), find_vocab(rest, where)


def _has_tensors(d) -> bool:
    import torch

    return isinstance(d, dict) and any(torch.is_tensor(v) for v in d.values())


def _find_state_dict(obj: dict, where: str) -> tuple[dict, dict]:
    """(the state_dict, the other entries) of a bare state_dict or a training checkpoint dict."""
    import torch

    if any(torch.is_tensor(v) for v in obj.values()):
        return obj, {k: v for k, v in obj.items() if not torch.is_tensor(v)}
    for key in NESTED_KEYS:
        if _has_tensors(obj.get(key)):
            return obj[key], {k: v for k, v in obj.items() if k != key}
        if isinstance(obj.get(key), dict):  # {"model": {"state_dict": ...}}
            inner = obj[key]
            for key2 in NESTED_KEYS:
                if _has_tensors(inner.get(key2)):
                    rest = {k: v for k, v in obj.items() if k != key}
                    rest.update({k: v for k, v in inner.items() if k != key2})
                    return inner[key2], rest
    subs = [k for k, v in obj.items() if _has_tensors(v)]
    if len(subs) == 1:
        return obj[subs[0]], {k: v for k, v in obj.items() if k != subs[0]}
    if subs:
        raise LstmInferError(f"{where}: holds several tensor dicts ({', '.join(map(str, subs))}); re-save the "
                             "model's own: torch.save(checkpoint[NAME], path)")
    raise LstmInferError(f"{where}: holds no tensors (keys: {', '.join(map(str, list(obj)[:8]))})")


def _as_arrays(state: dict, where: str) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for key, t in state.items():
        if not torch.is_tensor(t):
            continue
        if not isinstance(key, str):
            raise LstmInferError(f"{where}: state_dict key {key!r} is not a string")
        if not t.is_floating_point() or t.is_quantized or t.layout != torch.strided:
            if RECURRENT.match(key) or CELL_PARAM.search(key):
                raise LstmInferError(f"{where}: tensor '{key}' is {t.dtype} {t.layout}; the converter needs "
                                     "plain floating-point weights")
            continue  # integer buffers such as counters play no part in the forward pass
        out[key] = t.detach().to(torch.float32).numpy()
    return out


def _read_torchscript(path: Path) -> tuple[dict[str, np.ndarray], list[str] | None]:
    import torch

    where = str(path)
    extra = dict.fromkeys(EXTRA_VOCAB_FILES, "")
    try:
        # A TorchScript archive holds TorchScript code (compiled by the TorchScript runtime, not run by the
        # Python interpreter) and tensors; loading compiles that code but calls none of it, and its pickles
        # may only name TorchScript classes, so no Python code from the file runs. We only read the weights.
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:  # as in _read_pickled: damaged archives raise many types
        raise LstmInferError(f"{where}: torch.jit.load cannot read it, the archive is truncated or corrupt "
                             f"({_reason(err)})") from None
    state = _as_arrays(module.state_dict(), where)
    vocab = None
    for name, content in extra.items():
        if content:
            text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
            vocab = parse_vocab_text(text, f"{where} extra file {name}")
            break
    if vocab is None:
        attrs = {k: getattr(module, k) for k in VOCAB_KEYS if isinstance(getattr(module, k, None), (list, dict))}
        vocab = find_vocab(attrs, where)
    return state, vocab


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], list[str] | None]:
    from safetensors import safe_open

    where = str(path)
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # SafetensorError is not exported under a stable name across versions
        raise LstmInferError(f"{where}: not a readable .safetensors file, truncated or corrupt "
                             f"({_reason(err)})") from None
    out = {}
    for key, a in arrays.items():
        if a.dtype.kind == "f":
            out[key] = np.asarray(a, np.float32)
        elif RECURRENT.match(key) or CELL_PARAM.search(key):
            raise LstmInferError(f"{where}: tensor '{key}' has dtype {a.dtype}; the converter needs floating point")
    entries = {}
    for key in VOCAB_KEYS:  # metadata values are strings; a vocabulary there is JSON
        if key in meta:
            try:
                entries[key] = json.loads(meta[key])
            except (ValueError, RecursionError):
                raise LstmInferError(f"{where}: metadata '{key}' is not JSON") from None
    return out, find_vocab(entries, where)


# --------------------------------------------------------------------------- names

def _normalize(key: str) -> str:
    """Drop wrapper segments (DataParallel ``module``, torch.compile ``_orig_mod``) and WeightDrop's ``_raw``."""
    parts = [p for p in key.split(".") if p not in ("module", "_orig_mod")]
    if parts and parts[-1].endswith("_raw") and RECURRENT.match(parts[-1][:-4]):
        parts[-1] = parts[-1][:-4]
    return ".".join(parts)


def normalize_names(state: dict[str, np.ndarray], where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors under normalized names, normalized -> original name).

    WeightDrop keeps the trained weight as ``*_raw`` and may also save a dropped-out copy under the plain
    name: the raw one is the model's weight (dropout is off at inference), the copy is set aside.
    """
    arrays: dict[str, np.ndarray] = {}
    original: dict[str, str] = {}
    for key, arr in state.items():
        norm = _normalize(key)
        if norm in arrays:
            old = original[norm]
            if key.endswith("_raw") != old.endswith("_raw") and arr.shape == arrays[norm].shape:
                if old.endswith("_raw"):
                    continue
            else:
                raise LstmInferError(f"{where}: tensors '{old}' and '{key}' both stand for '{norm}'")
        arrays[norm], original[norm] = arr, key
    return arrays, original


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


# --------------------------------------------------------------------------- recurrent modules

@dataclass(eq=False)
class Recurrent:
    """One nn.LSTM / GRU / RNN found in a state_dict."""

    prefix: str
    cell: str
    direction: str
    layers: list[dict]  # format.layer_config entries
    tensors: list[list[dict[str, np.ndarray]]]  # per layer, per direction: layout.from_torch output
    keys: set[str] = field(default_factory=set)

    @property
    def input_size(self) -> int:
        return self.layers[0]["input_size"]

    @property
    def output_size(self) -> int:
        return fmt.layer_output_size(self.layers[-1])

    @property
    def label(self) -> str:
        return self.prefix or "(top level)"


def find_recurrent(arrays: dict[str, np.ndarray], where: str, nonlinearity: str) -> dict[str, Recurrent]:
    """Every recurrent module in the state_dict, by prefix, its shapes checked."""
    groups: dict[str, dict[tuple[str, int, bool], str]] = {}
    for key in arrays:
        m = RECURRENT.match(key)
        if m:
            groups.setdefault(m["prefix"] or "", {})[(m["kind"], int(m["layer"]), bool(m["rev"]))] = key
    return {prefix: _recurrent(prefix, g, arrays, where, nonlinearity) for prefix, g in groups.items()}


def _recurrent(prefix: str, keys: dict, arrays: dict, where: str, nonlinearity: str) -> Recurrent:
    label = prefix or "(top level)"
    n = max(layer for _, layer, _ in keys) + 1
    bidi = any(rev for _, _, rev in keys)
    dirs = (False, True) if bidi else (False,)
    rec = Recurrent(prefix, "", "bidirectional" if bidi else "forward", [], [], set(keys.values()))
    in_size = None
    for k in range(n):
        per_dir, shape = [], None
        for rev in dirs:
            sfx = f"_l{k}{'_reverse' if rev else ''}"
            part = {kind: arrays[key] for (kind, layer, r), key in keys.items() if layer == k and r == rev}
            get = part.get
            w_ih, w_hh, w_hr = get("weight_ih"), get("weight_hh"), get("weight_hr")
            if w_ih is None or w_hh is None:
                raise LstmInferError(f"{where}: recurrent module {label} lacks weight_ih{sfx} or weight_hh{sfx}")
            cell, h, p = _cell_shape(w_ih, w_hh, w_hr, f"{where}: {label} layer {k}")
            for kind in ("bias_ih", "bias_hh"):
                b = get(kind)
                if b is not None and b.shape != (w_ih.shape[0],):
                    raise LstmInferError(f"{where}: {label}.{kind}{sfx} has shape {b.shape}, expected "
                                         f"({w_ih.shape[0]},)")
            here = (cell, h, p, w_ih.shape[1])
            if shape is not None and here != shape:
                raise LstmInferError(f"{where}: {label} layer {k}: the two directions differ in shape")
            shape = here
            per_dir.append(layout.from_torch(cell, w_ih, w_hh, get("bias_ih"), get("bias_hh"), w_hr))
        cell, h, p, i = shape
        if rec.cell and cell != rec.cell:
            raise LstmInferError(f"{where}: {label} mixes {rec.cell} and {cell} layers")
        if in_size is not None and i != in_size:
            raise LstmInferError(f"{where}: {label} layer {k} takes inputs of size {i}, layer {k - 1} emits {in_size}")
        rec.cell = cell
        lc = fmt.layer_config(cell, i, h, proj_size=p, direction=rec.direction, nonlinearity=nonlinearity,
                              linear_before_reset=cell == "gru")
        rec.layers.append(lc)
        rec.tensors.append(per_dir)
        in_size = fmt.layer_output_size(lc)
    return rec


def _cell_shape(w_ih: np.ndarray, w_hh: np.ndarray, w_hr: np.ndarray | None, where: str) -> tuple[str, int, int]:
    """(cell, hidden_size, proj_size) from weight_ih (G*H, I), weight_hh (G*H, H_out), weight_hr (P, H)."""
    if w_ih.ndim != 2 or w_hh.ndim != 2 or w_ih.shape[0] != w_hh.shape[0]:
        raise LstmInferError(f"{where}: weight_ih {w_ih.shape} and weight_hh {w_hh.shape} do not fit together")
    gh = w_ih.shape[0]
    if w_hr is not None:
        if w_hr.ndim != 2 or w_hr.shape[0] != w_hh.shape[1] or gh != 4 * w_hr.shape[1]:
            raise LstmInferError(f"{where}: weight_hr {w_hr.shape} does not fit weight_hh {w_hh.shape} "
                                 "of an LSTM with projections")
        return "lstm", w_hr.shape[1], w_hr.shape[0]
    h = w_hh.shape[1]
    cell = GATES_TO_CELL.get(gh // h) if gh % h == 0 else None
    if cell is None:
        raise LstmInferError(f"{where}: weight_ih has {gh} rows for hidden size {h}: not 4H (LSTM), 3H (GRU) "
                             "or H (RNN)")
    return cell, h, 0


def choose_stack(mods: dict[str, Recurrent], option: str | None, where: str) -> list[Recurrent]:
    """The recurrent modules that form the stack, in order: one module, a ModuleList, or the --rnn choice."""
    if not mods:
        return []
    names = ", ".join(m.label for m in sorted(mods.values(), key=lambda m: _natural(m.prefix)))
    if option is not None:
        chosen: list[Recurrent] = []
        for part in (p.strip() for p in option.split(",")):
            norm = _normalize(part)
            hits = [m for p, m in mods.items() if p == norm or p.startswith(norm + ".") or norm == ""]
            if not hits:
                raise LstmInferError(f"{where}: --rnn {part!r} names no recurrent module (found: {names})")
            chosen += [m for m in sorted(hits, key=lambda m: _natural(m.prefix)) if m not in chosen]
        return chosen
    if len(mods) == 1:
        return list(mods.values())
    parents = {p.rpartition(".")[0] for p in mods}
    if len(parents) == 1 and all(p.rpartition(".")[2].isdigit() for p in mods):
        return sorted(mods.values(), key=lambda m: _natural(m.prefix))
    raise LstmInferError(f"{where}: found several recurrent modules ({names}); say which form the stack, in "
                         "order, with --rnn NAME[,NAME...]")


# --------------------------------------------------------------------------- embedding and head

def _modules(arrays: dict[str, np.ndarray], used: set[str]) -> dict[str, dict[str, str]]:
    """Unused tensors grouped by module: prefix -> {parameter name -> key}."""
    mods: dict[str, dict[str, str]] = {}
    for key in arrays:
        if key not in used:
            prefix, _, param = key.rpartition(".")
            mods.setdefault(prefix, {})[param] = key
    return mods


def _hinted(name: str, hints: tuple[str, ...]) -> bool:
    low = name.lower()
    return any(h in low for h in hints)


def _resolve(option: str, arrays: dict, where: str, flag: str) -> str:
    """A --embedding / --head value (a tensor key or a module prefix) -> the module prefix."""
    norm = _normalize(option)
    if norm in arrays and "." in norm and norm.rpartition(".")[2] in ("weight", "bias"):
        return norm.rpartition(".")[0]
    if any(k.startswith(norm + ".") and k.count(".") == norm.count(".") + 1 for k in arrays) or \
            (norm + ".weight") in arrays:
        return norm
    raise LstmInferError(f"{where}: {flag} {option!r} names no tensor or module in the checkpoint")


def _dedupe(cands: list[str], arrays: dict, mods: dict, used: set[str]) -> list[str]:
    """Drop candidates that are exact copies of an earlier one (fastai saves encoder and encoder_dp.emb)."""
    kept: list[str] = []
    for c in cands:
        w = arrays[mods[c]["weight"]]
        twin = next((k for k in kept if arrays[mods[k]["weight"]].shape == w.shape
                     and np.array_equal(arrays[mods[k]["weight"]], w)), None)
        if twin is None:
            kept.append(c)
        else:
            used.update(mods[c].values())
    return kept


def _ambiguous(role: str, cands: list[str], mods: dict, arrays: dict, where: str, flag: str) -> LstmInferError:
    listed = ", ".join(f"{c} {tuple(arrays[next(iter(mods[c].values()))].shape)}" for c in cands)
    return LstmInferError(f"{where}: several tensors could be the {role} ({listed}); say which with {flag} NAME")


def find_embedding(arrays: dict, used: set[str], in_size: int, option: str | None, where: str) -> str | None:
    """The embedding's key (its rows are token vectors of size ``in_size``), or None."""
    mods = _modules(arrays, used)
    if option is not None:
        prefix = _resolve(option, arrays, where, "--embedding")
        key = prefix + ".weight" if prefix else "weight"
        w = arrays.get(key)
        if w is None or w.ndim != 2 or w.shape[1] != in_size:
            shape = None if w is None else w.shape
            raise LstmInferError(f"{where}: --embedding {option!r}: {key} has shape {shape}; the recurrent stack "
                                 f"needs (V, {in_size})")
        return key
    cands = [p for p, params in mods.items() if set(params) == {"weight"} and arrays[params["weight"]].ndim == 2
             and arrays[params["weight"]].shape[1] == in_size and (_hinted(p, EMB_HINTS) or not _hinted(p, HEAD_HINTS))]
    cands = _dedupe(sorted(cands, key=_natural), arrays, mods, used)
    if len(cands) > 1:
        hinted = [c for c in cands if _hinted(c, EMB_HINTS)]
        if len(hinted) != 1:
            raise _ambiguous("embedding", cands, mods, arrays, where, "--embedding")
        cands = hinted
    return mods[cands[0]]["weight"] if cands else None


@dataclass
class Head:
    weight: str | None  # key of (K, F); None when tied to the embedding
    bias: str | None  # key of (K,)
    tied: bool
    output_size: int


def find_head(arrays: dict, used: set[str], feat: int, emb_key: str | None, option: str | None,
              where: str) -> Head | None:
    """The output layer over the last recurrent layer's ``feat`` features, or None."""
    emb = arrays.get(emb_key) if emb_key else None
    mods = _modules(arrays, used)
    if option is not None:
        prefix = _resolve(option, arrays, where, "--head")
        if emb_key is not None and prefix == emb_key.rpartition(".")[0]:
            if emb.shape[1] != feat:
                raise LstmInferError(f"{where}: --head {option!r}: the embedding {emb.shape} cannot be the head "
                                     f"over {feat} features")
            return Head(None, None, True, emb.shape[0])
        head = _head_of(prefix, mods.get(prefix, {}), arrays, feat, emb)
        if head is None:
            shapes = {k: arrays[k].shape for k in mods.get(prefix, {}).values()}
            raise LstmInferError(f"{where}: --head {option!r} is not a linear layer over {feat} features ({shapes})")
        return head
    heads = {p: h for p, ps in mods.items() if (h := _head_of(p, ps, arrays, feat, emb)) is not None}
    cands = sorted(heads, key=_natural)
    if len(cands) > 1:
        hinted = [c for c in cands if _hinted(c, HEAD_HINTS)]
        if len(hinted) != 1:
            raise _ambiguous("output head", cands, mods, arrays, where, "--head")
        cands = hinted
    return heads[cands[0]] if cands else None


def _head_of(prefix: str, params: dict[str, str], arrays: dict, feat: int, emb: np.ndarray | None) -> Head | None:
    """A Linear (weight (K, feat) [+ bias (K,)]), or a bias alone whose weight is the embedding, else None."""
    if not params or not set(params) <= {"weight", "bias"}:
        return None
    w = arrays[params["weight"]] if "weight" in params else None
    b = arrays[params["bias"]] if "bias" in params else None
    if w is None:  # tied weight not saved (safetensors drops shared tensors): the bias must fit the embedding
        if emb is None or b is None or b.shape != (emb.shape[0],) or emb.shape[1] != feat:
            return None
        return Head(None, params["bias"], True, emb.shape[0])
    if w.ndim != 2 or w.shape[1] != feat or (b is not None and b.shape != (w.shape[0],)):
        return None
    tied = emb is not None and emb.shape == w.shape and np.array_equal(emb, w)
    return Head(params["weight"], params.get("bias"), tied, w.shape[0])


# --------------------------------------------------------------------------- the spec

def build_spec(arrays: dict[str, np.ndarray], original: dict[str, str], where: str, *, nonlinearity: str = "tanh",
               embedding: str | None = None, rnn: str | None = None, head: str | None = None
               ) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, engine tensors) from a state_dict under normalized names."""
    if nonlinearity not in ("tanh", "relu"):
        raise LstmInferError(f"nonlinearity {nonlinearity!r} must be tanh or relu")
    mods = find_recurrent(arrays, where, nonlinearity)
    stack = choose_stack(mods, rnn, where)
    if not stack:
        cells = sorted(k for k in arrays if CELL_PARAM.search(k))
        why = (f" ({cells[0]} looks like an nn.LSTMCell / GRUCell, whose time loop is Python code the converter "
               "cannot see; use nn.LSTM / GRU / RNN)") if cells else ""
        raise LstmInferError(f"{where}: no recurrent weights (weight_ih_l0, weight_hh_l0, ...) found{why}")
    for prev, nxt in zip(stack, stack[1:]):
        if nxt.input_size != prev.output_size:
            raise LstmInferError(f"{where}: {nxt.label} takes inputs of size {nxt.input_size} but {prev.label} "
                                 f"emits {prev.output_size}; choose the stack with --rnn NAME[,NAME...]")
    if nonlinearity == "relu" and not any(m.cell == "rnn" for m in stack):
        raise LstmInferError(f"{where}: --nonlinearity relu applies to nn.RNN only; this model is "
                             f"{'/'.join(sorted({m.cell for m in stack}))}")
    used = set().union(*(m.keys for m in stack))
    emb_key = find_embedding(arrays, used, stack[0].input_size, embedding, where)
    if emb_key is not None:
        used.add(emb_key)
    feat = stack[-1].output_size
    hd = find_head(arrays, used, feat, emb_key, head, where)
    if hd is not None:
        used.update(k for k in (hd.weight, hd.bias) if k)
    if emb_key is not None and hd is None and embedding is None and not _hinted(emb_key, EMB_HINTS) \
            and arrays[emb_key].shape[1] == feat:
        raise LstmInferError(f"{where}: {original[emb_key]} could be the embedding or the output head; say which "
                             f"with --embedding NAME or --head NAME")
    _check_all_used(arrays, used, original, mods, stack, where)

    layers, tensors = [], {}
    for m in stack:
        for lc, per_dir in zip(m.layers, m.tensors):
            tensors.update(layout.layer_tensors(len(layers), m.direction, per_dir))
            layers.append(lc)
    emb_cfg = head_cfg = None
    if emb_key is not None:
        tensors["embedding"] = arrays[emb_key]
        emb_cfg = {"vocab_size": int(arrays[emb_key].shape[0]), "dim": int(arrays[emb_key].shape[1])}
    if hd is not None:
        if not hd.tied:
            tensors["head.weight"] = arrays[hd.weight]
        if hd.bias:
            tensors["head.bias"] = arrays[hd.bias]
        head_cfg = {"output_size": int(hd.output_size), "input_size": int(feat), "tied": hd.tied,
                    "bias": hd.bias is not None}
    roles = {"embedding": original.get(emb_key), "rnn": [m.prefix for m in stack],
             "head": original.get(hd.weight or hd.bias) if hd else None}
    provenance = {"roles": roles}
    if any(m.cell == "rnn" for m in stack):
        provenance["nonlinearity"] = nonlinearity
    return fmt.make_config(layers, embedding=emb_cfg, head=head_cfg, provenance=provenance), tensors


def _check_all_used(arrays: dict, used: set[str], original: dict, mods: dict, stack: list, where: str) -> None:
    left = sorted((k for k in arrays if k not in used), key=_natural)
    if not left:
        return
    listed = ", ".join(f"{original[k]} {tuple(arrays[k].shape)}" for k in left[:6]) + (" ..." if len(left) > 6 else "")
    if any(RECURRENT.match(k) or CELL_PARAM.search(k) for k in left):
        other = [m.label for m in mods.values() if all(m is not s for s in stack)]
        raise LstmInferError(f"{where}: recurrent weights outside the chosen stack ({listed}); "
                             + (f"modules not in the stack: {', '.join(other)}; choose with --rnn NAME[,NAME...]"
                                if other else "the converter cannot place them"))
    raise LstmInferError(f"{where}: tensors that take no part in embedding -> recurrent layers -> linear head "
                         f"({listed}); the engine would ignore them and give different numbers (choose roles with "
                         "--embedding / --rnn / --head)")


def load_torch(path: Path, kind: str, *, nonlinearity: str = "tanh", embedding: str | None = None,
               rnn: str | None = None, head: str | None = None) -> tuple[dict, dict[str, np.ndarray], list[str] | None]:
    """A PyTorch checkpoint -> (config without tokenizer, engine tensors, vocabulary found in it or None).

    ``kind``: "torch-zip", "torch-legacy-pickle", "torchscript" or "safetensors" (see converters.detect_kind).
    """
    where = str(path)
    state, vocab = read_checkpoint(path, kind)
    arrays, original = normalize_names(state, where)
    config, tensors = build_spec(arrays, original, where, nonlinearity=nonlinearity, embedding=embedding,
                                 rnn=rnn, head=head)
    bad = next((k for k, a in tensors.items() if not np.isfinite(a).all()), None)
    if bad is not None:
        raise LstmInferError(f"{where}: the weights for '{bad}' hold NaN or Inf values")
    return config, tensors, vocab
