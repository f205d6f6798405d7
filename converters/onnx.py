"""ONNX -> the spec triple ``(config, tensors, None)`` that ``lstm_infer.format.write_model`` saves.

What converts: one input sequence (int ids into a ``Gather`` over an initializer, or float features),
a chain of ONNX ``LSTM`` / ``GRU`` / ``RNN`` nodes, an optional ``MatMul`` (+``Add``) or ``Gemm`` head and
an optional final ``Softmax`` / ``LogSoftmax``, with the shape glue exporters put in between (Squeeze,
Unsqueeze, Transpose, Reshape, Flatten, Identity, Cast, Dropout, and Shape / Gather / Slice / Concat /
ConstantOfShape / Constant computing shapes or constant weights). Graphs from ``torch.onnx.export``
(legacy exporter, opsets 9-22) and hand-built single-node graphs are both covered.

How: the graph is evaluated abstractly in topological order. Constant subgraphs are folded with NumPy;
the data path is a ``_Stream`` whose axes are tuples of named atoms (time, batch, layer k's directions
and hidden units, ...), so a Transpose + Reshape between layers is accepted exactly when it lays the
features out as the engine does (forward then backward), and anything else on the data path is refused.
Everything refused is collected and reported in ONE error naming each node and op.

Decisions:

- Initial state (``initial_h`` / ``initial_c``): zeros (a constant, or ConstantOfShape of a dynamic shape)
  is the engine's default and is dropped; a graph input is the engine's run-time ``state`` (recorded in
  provenance); a constant non-zero state is refused, since the model directory stores no state and a
  constant of one static batch size must not limit the converted model: make it a graph input and pass
  it to ``Model.run(x, state)`` instead.
- ``sequence_lens`` must be one graph input shared by every layer (the engine's ``lengths``). A row of
  length 0 keeps its initial state in the engine; onnxruntime returns zeros for it.
- ``layout=1`` only changes run-time axes: recorded in provenance (``layouts``, ``batch_first`` for the
  input, ``output_axes`` for the main output, e.g. ``["T", "D", "B", "H"]`` for a bare node's Y); the
  state of a layout=1 node is (B, D, H) in ONNX and (D, B, H) in the engine.
- A final Softmax / LogSoftmax is dropped (``logits`` / ``log_probs`` are the caller's choice) and
  recorded as ``provenance["final"]``.
- Activation alpha/beta are consumed in order by the activations that take them, as onnxruntime does;
  missing ones get the ONNX operators' defaults (``lstm_infer.format.activation``).
- Weights in float16 / bfloat16 / float64 are cast to float32; a head whose weight equals the embedding
  (same initializer, its Transpose, or an exporter's folded copy) is stored tied.
- External data is resolved by hand, refusing locations that are absolute or lead outside the folder.
"""

from __future__ import annotations

import hashlib
import math
import pathlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lstm_infer
from lstm_infer import format as fmt
from lstm_infer.errors import LstmInferError

from . import layout

F32 = np.float32
RECURRENT = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}
RECURRENT_ATTRS = {"activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size",
                   "layout", "output_sequence"}
CELL_ATTRS = {"lstm": {"input_forget"}, "gru": {"linear_before_reset"}, "rnn": set()}
# Which activations take alpha / beta (onnxruntime consumes the lists in this order).
ACT_ARGS = {"hardsigmoid": (1, 1), "leakyrelu": (1, 0), "thresholdedrelu": (1, 0), "scaledtanh": (1, 1),
            "affine": (1, 1), "elu": (1, 0)}
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
INTS = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8,
        TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
TENSOR_TYPES = FLOATS | INTS | {TensorProto.BOOL}
MAX_CONST = 1 << 26  # elements a folded constant may have: more is a memory bomb, not glue
MAX_LISTED = 12  # problems named in the one error message


def load_onnx(path: pathlib.Path) -> tuple[dict, dict[str, np.ndarray], None]:
    """Read an ONNX file and return ``(config, tensors, None)`` for ``lstm_infer.format.write_model``.

    Raises ``LstmInferError`` (one line naming ``path``) for anything that is not a convertible model.
    """
    path = pathlib.Path(path)
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LstmInferError(f"{where}: cannot read the file ({err.strerror or err})") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # noqa: BLE001 - protobuf raises several types for a bad file
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LstmInferError(f"{where}: not an ONNX model, or a truncated one ({msg})") from None
    if not model.ir_version or not model.HasField("graph") or not model.graph.node:
        raise LstmInferError(f"{where}: not an ONNX model, or a truncated one (no graph)")
    g = model.graph
    names = [o.domain for o in model.opset_import] + [t.name for t in g.initializer] + [
        v.name for v in (*g.input, *g.output)] + [x for n in g.node for x in (
            n.name, n.op_type, n.domain, *n.input, *n.output, *(a.name for a in n.attribute))]
    if not all(isinstance(x, str) for x in names):  # protobuf hands back bytes for a proto2 string that is not UTF-8
        raise LstmInferError(f"{where}: names in the graph are not valid UTF-8 (a damaged file)")
    opsets = {o.domain: o.version for o in model.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset is None:
        raise LstmInferError(f"{where}: the model imports no default-domain opset")
    walk = _Walker(path, model.graph, opset)
    try:
        config, tensors = walk.run()
    except LstmInferError as err:  # names from the file may hold line breaks: the message stays one line
        raise LstmInferError(str(err).replace("\r", "\\r").replace("\n", "\\n")) from None
    config["provenance"] = {
        "source": path.name, "sha256": hashlib.sha256(data).hexdigest(), "source_kind": "onnx",
        "opset": int(opset), "converter": "lstm-infer " + lstm_infer.__version__,
        "producer": f"{model.producer_name} {model.producer_version}".strip(), **walk.notes}
    return config, tensors, None


# --------------------------------------------------------------------------- tensors and external data

def _tensor(t: TensorProto, root: pathlib.Path, where: str) -> np.ndarray:
    """A TensorProto as a NumPy array: raw_data, typed fields or external data; sizes checked first."""
    what = f"{where}: tensor '{t.name}'"
    if t.data_type not in TENSOR_TYPES:
        name = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() \
            else str(t.data_type)
        raise LstmInferError(f"{what}: data type {name} is not supported")
    dims = list(t.dims)
    if any(d < 0 for d in dims) or math.prod(dims) > fmt.MAX_PARAMS:
        raise LstmInferError(f"{what}: absurd dimensions {dims}")
    if t.data_location == TensorProto.EXTERNAL:
        t = _resolve_external(t, root, what)
    try:
        return numpy_helper.to_array(t)
    except Exception as err:  # noqa: BLE001 - a size mismatch surfaces as ValueError or TypeError
        raise LstmInferError(f"{what}: unreadable data ({str(err).splitlines()[0] if str(err) else err})") from None


def _resolve_external(t: TensorProto, root: pathlib.Path, what: str) -> TensorProto:
    """Read a tensor's external bytes, refusing locations that are absolute or lead out of ``root``."""
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if not loc:
        raise LstmInferError(f"{what}: external data without a location")
    if pathlib.PurePosixPath(loc).is_absolute() or pathlib.PureWindowsPath(loc).is_absolute() \
            or pathlib.PureWindowsPath(loc).drive:
        raise LstmInferError(f"{what}: external data location '{loc}' is absolute; refusing it")
    file = root / loc
    try:
        file.resolve().relative_to(root.resolve())
    except ValueError:
        raise LstmInferError(f"{what}: external data location '{loc}' resolves outside the model's folder; "
                             "refusing it") from None
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise LstmInferError(f"{what}: external data offset/length are not integers") from None
    need = math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    if offset < 0 or (length is not None and length != need):
        raise LstmInferError(f"{what}: external data length {length} does not match its shape {list(t.dims)}")
    try:
        with open(file, "rb") as fh:
            size = fh.seek(0, 2)
            if offset + need > size:
                raise LstmInferError(f"{what}: external data file '{loc}' is too short ({size} bytes, "
                                     f"needs {offset + need})")
            fh.seek(offset)
            raw = fh.read(need)
    except OSError as err:
        raise LstmInferError(f"{what}: cannot read external data '{loc}' ({err.strerror or err})") from None
    out = TensorProto()
    out.CopyFrom(t)
    del out.external_data[:]
    out.data_location = TensorProto.DEFAULT
    out.raw_data = raw
    return out


# --------------------------------------------------------------------------- abstract values

@dataclass
class _Const:
    """A value known at conversion time."""
    arr: np.ndarray


@dataclass
class _Fill:
    """Every element equals ``value``; the shape is known only at run time (ConstantOfShape of a Shape)."""
    value: float


@dataclass
class _Dims:
    """A 1-D shape vector (or a scalar): items are ints or axes (tuples of atoms); None = unknown."""
    items: list | None
    scalar: bool = False


@dataclass
class _Stream:
    """The data path. kind: ids (before the embedding), feat (features), head (logits), probs (softmaxed).

    ``stage`` counts the recurrent layers already applied.
    """
    axes: list[tuple[str, ...]]
    kind: str
    stage: int


@dataclass
class _Side:
    """Derived from a run-time input other than the sequence: initial state or sequence_lens."""
    source: str


@dataclass
class _Final:
    """Y_h / Y_c of a recurrent node: the engine returns them as ``state``."""


BAD = object()  # a value whose problem has already been reported


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else [x.decode() if isinstance(x, bytes) else x for x in v] \
            if isinstance(v, list) else v
    return out


# --------------------------------------------------------------------------- the walk

@dataclass
class _Walker:
    path: pathlib.Path
    graph: onnx.GraphProto
    opset: int
    values: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)  # atom -> size (None: known at run time)
    units: set = field(default_factory=set)  # atoms of size 1 that reshapes may drop or insert
    problems: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    tensors: dict = field(default_factory=dict)
    feat: list = field(default_factory=list)  # atoms of the current stage's features, in order
    tb: tuple | None = None  # (time atom, batch atom)
    lens: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    head: dict | None = None
    producer: dict = field(default_factory=dict)  # tensor name -> node
    live_tensors: set = field(default_factory=set)

    # ------------------------------------------------------------------ driver
    def run(self) -> tuple[dict, dict[str, np.ndarray]]:
        where = str(self.path)
        root = self.path.parent
        for t in self.graph.initializer:
            self.values[t.name] = _Const(_tensor(t, root, where))
        nodes = self._order()
        live = self._live(nodes)
        self._inputs(nodes, live)
        for node in nodes:
            if id(node) not in live:
                continue
            try:
                self._eval(node)
            except LstmInferError:
                raise
            except (ValueError, IndexError, KeyError, TypeError, ZeroDivisionError, AttributeError) as err:
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                self._problem(node, f"malformed node ({msg})")  # attributes or inputs out of spec
                for o in node.output:
                    self.values[o] = BAD
        cfg = self._finish()
        if self.problems:
            more = len(self.problems) - MAX_LISTED
            listed = "; ".join(self.problems[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
            raise LstmInferError(f"{where}: cannot convert: {listed}")
        return cfg, self.tensors

    def _fail(self, msg: str) -> None:
        raise LstmInferError(f"{self.path}: {msg}")

    def _problem(self, node: onnx.NodeProto | None, msg: str):
        self.problems.append((f"node '{_name(node)}' ({node.op_type}): " if node is not None else "") + msg)
        return BAD

    def _order(self) -> list[onnx.NodeProto]:
        """Nodes in topological order; refuses unknown inputs, reused output names and cycles."""
        known = set(self.values) | {i.name for i in self.graph.input} | {""}
        producer = {}
        for n in self.graph.node:
            for o in n.output:
                if o and (o in producer or o in known):
                    self._fail(f"tensor '{o}' is produced twice (node '{_name(n)}')")
                if o:
                    producer[o] = n
        deps, users = {}, {}
        for n in self.graph.node:
            missing = [i for i in n.input if i not in known and i not in producer]
            if missing:
                self._fail(f"node '{_name(n)}' ({n.op_type}) reads '{missing[0]}', which no node, initializer "
                           "or graph input provides (missing initializer?)")
            pre = {id(producer[i]) for i in n.input if i in producer}
            deps[id(n)] = len(pre)
            for p in pre:
                users.setdefault(p, []).append(n)
        ready = deque(n for n in self.graph.node if deps[id(n)] == 0)
        order = []
        while ready:
            n = ready.popleft()
            order.append(n)
            for u in users.get(id(n), ()):
                deps[id(u)] -= 1
                if deps[id(u)] == 0:
                    ready.append(u)
        if len(order) != len(self.graph.node):
            stuck = next(n for n in self.graph.node if deps[id(n)] > 0)
            self._fail(f"the graph has a cycle (through node '{_name(stuck)}')")
        self.producer = producer
        return order

    def _live(self, nodes: list[onnx.NodeProto]) -> set[int]:
        """Nodes some graph output depends on; the rest is ignored."""
        need = {o.name for o in self.graph.output}
        live = set()
        for n in reversed(nodes):
            if any(o in need for o in n.output):
                live.add(id(n))
                need.update(i for i in n.input if i)
        self.live_tensors = need
        return live

    def _inputs(self, nodes: list[onnx.NodeProto], live: set[int]) -> None:
        """Give each graph input its role: the sequence (ids or features) or a side input (state, lengths)."""
        graph_inputs = {i.name: i for i in self.graph.input if i.name not in self.values}
        side = set()
        todo = [i for n in nodes if id(n) in live and n.op_type in RECURRENT for i in n.input[4:7] if i]
        seen = set()
        while todo:  # walk back from state / lengths inputs; a Shape reads no data, so stop there
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in graph_inputs:
                side.add(name)
            elif name in self.producer and self.producer[name].op_type != "Shape":
                todo.extend(i for i in self.producer[name].input if i)
        used = [n for n in graph_inputs if n in self.live_tensors]
        main = [n for n in used if n not in side]
        for name in side:
            self.values[name] = _Side(name)
        if len(main) > 1:
            self._fail(f"graph inputs {', '.join(repr(m) for m in main)}: the engine takes one input sequence "
                       "(ids or features); other inputs may only feed initial_h, initial_c or sequence_lens")
        if not main:
            self._fail("no graph input feeds the model (the input sequence must be a graph input)")
        vi = graph_inputs[main[0]]
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            self._fail(f"graph input '{vi.name}' has no declared tensor shape (rank)")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        if tt.elem_type in INTS:
            kind, names = "ids", [f"in{k}" for k in range(len(dims))]
        elif tt.elem_type in FLOATS:
            kind, names = "feat", [f"in{k}" for k in range(len(dims) - 1)] + ["I"]
            self.feat = ["I"]
        else:
            self._fail(f"graph input '{vi.name}' must hold token ids or floats")
        self.sizes.update(zip(names, dims))
        self.values[vi.name] = _Stream([(a,) for a in names], kind, 0)
        self.notes["input"] = vi.name

    # ------------------------------------------------------------------ one node
    def _eval(self, node: onnx.NodeProto) -> None:
        ins = [self.values[i] if i else None for i in node.input]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            outs = self._problem(node, f"unsupported op (domain '{node.domain}')")
        elif op not in RECURRENT and op not in HANDLERS and op not in GLUE and op != "Constant":
            outs = self._problem(node, "unsupported op")  # reported even downstream of another problem
        elif any(v is BAD for v in ins):
            outs = BAD
        elif op in RECURRENT:
            outs = self._recurrent(node, ins)
        elif op == "Constant":
            outs = self._constant(node)
        else:
            outs = self._special(node, ins) if op in HANDLERS else None
            if outs is None:
                outs = self._glue(node, ins)
        if not isinstance(outs, list):
            outs = [outs] + [BAD] * (len(node.output) - 1)
            if op == "Dropout" and len(node.output) > 1 and node.output[1] in self.live_tensors:
                self._problem(node, "the Dropout mask is used")
        for name, v in zip(node.output, outs):
            if name:
                self.values[name] = v

    def _constant(self, node: onnx.NodeProto):
        a = _attrs(node)
        if "value" in a:
            return _Const(_tensor(a["value"], self.path.parent, str(self.path)))
        for key, dtype in (("value_float", F32), ("value_floats", F32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in a:
                return _Const(np.array(a[key], dtype))
        return self._problem(node, "unsupported Constant (only tensors and numbers)")

    def _special(self, node: onnx.NodeProto, ins: list):
        """Ops with a model meaning on the data path; None hands the node on to the glue rules."""
        op = node.op_type
        data = ins[0] if ins else None
        if op == "Gather" and isinstance(ins[1], _Stream) and ins[1].kind == "ids" and isinstance(data, _Const):
            return self._embedding(node, data.arr, ins[1])
        if op in ("MatMul", "Gemm") and isinstance(data, _Stream):
            return self._head(node, ins)
        if op == "Add" and any(isinstance(v, _Stream) for v in ins):
            return self._bias(node, ins)
        if op in ("Softmax", "LogSoftmax"):
            return self._softmax(node, data)
        if op in ARITH and not all(isinstance(v, _Const) for v in ins if v is not None):
            return self._problem(node, "arithmetic is only supported on constants and as the linear head")
        return None

    # ------------------------------------------------------------------ model pieces
    def _embedding(self, node: onnx.NodeProto, table: np.ndarray, ids: _Stream):
        if _attrs(node).get("axis", 0) != 0 or table.ndim != 2 or not np.issubdtype(table.dtype, np.floating):
            return self._problem(node, "an embedding Gather needs a 2-D float table and axis 0")
        if "embedding" in self.tensors:
            return self._problem(node, "a second embedding lookup")
        self.tensors["embedding"] = np.asarray(table, F32)
        self.sizes["E"] = table.shape[1]
        self.feat = ["E"]
        return _Stream(ids.axes + [("E",)], "feat", 0)

    def _recurrent(self, node: onnx.NodeProto, ins: list):
        cell = RECURRENT[node.op_type]
        a = _attrs(node)
        extra = sorted(set(a) - RECURRENT_ATTRS - CELL_ATTRS[cell])
        if extra:
            return self._problem(node, f"unsupported attribute(s) {', '.join(extra)}")
        ins = ins + [None] * (8 - len(ins))
        direction = a.get("direction", "forward")
        if direction not in fmt.DIRECTIONS:
            return self._problem(node, f"unknown direction {direction!r}")
        nd, g = len(fmt.DIRECTIONS[direction]), fmt.CELLS[cell]
        w, r, b = ins[1], ins[2], ins[3]
        p = ins[7] if cell == "lstm" else None
        if not all(isinstance(v, _Const) for v in (w, r)) or any(v is not None and not isinstance(v, _Const)
                                                                 for v in (b, p)):
            return self._problem(node, "W, R, B and P must be constants (initializers)")
        w, r = w.arr, r.arr
        h = a.get("hidden_size", r.shape[-1] if r.ndim == 3 else 0)
        shapes_ok = (w.ndim == 3 and w.shape[:2] == (nd, g * h) and r.shape == (nd, g * h, h)
                     and (b is None or b.arr.shape == (nd, 2 * g * h)) and (p is None or p.arr.shape == (nd, 3 * h)))
        if not shapes_ok or not 0 < h <= fmt.MAX_DIM:
            return self._problem(node, f"weight shapes W {list(w.shape)}, R {list(r.shape)} do not fit "
                                 f"hidden_size {h} and direction {direction}")
        lay = a.get("layout", 0)
        clip = a.get("clip")
        if lay not in (0, 1) or (clip is not None and not (math.isfinite(clip) and clip > 0)):
            return self._problem(node, f"layout must be 0 or 1 and clip positive (got {lay}, {clip})")
        acts = self._activations(node, cell, nd, a)
        if acts is None or not self._sequence(node, ins[0], lay, w.shape[2]):
            return BAD
        self._state(node, ins[4], ins[5:7] if cell == "lstm" else ins[5:6])
        lbr = bool(a.get("linear_before_reset", 0))
        if p is not None and not p.arr.any():
            p = None  # all-zero peepholes are no peepholes
        per_dir = [layout.from_onnx(cell, w[d], r[d], None if b is None else b.arr[d],
                                    None if p is None else p.arr[d], linear_before_reset=lbr) for d in range(nd)]
        k = len(self.layers)
        self.tensors.update(layout.layer_tensors(k, direction, per_dir))
        self.layers.append(fmt.layer_config(
            cell, w.shape[2], h, direction=direction, peepholes=p is not None, activations=acts, clip=clip,
            input_forget=bool(a.get("input_forget", 0)), linear_before_reset=lbr))
        self.notes.setdefault("layouts", []).append(lay)
        dk, hk = f"D{k}", f"H{k}"
        self.sizes.update({dk: nd, hk: h})
        if nd == 1:
            self.units.add(dk)
        self.feat = [dk, hk] if nd == 2 else [hk]
        t, bt = self.tb
        axes = [(t,), (dk,), (bt,), (hk,)] if lay == 0 else [(bt,), (t,), (dk,), (hk,)]
        return [_Stream(axes, "feat", k + 1), _Final(), _Final()]

    def _activations(self, node: onnx.NodeProto, cell: str, nd: int, a: dict) -> list[list[dict]] | None:
        names = a.get("activations") or list(fmt.DEFAULT_ACTIVATIONS[cell]) * nd
        n = len(fmt.DEFAULT_ACTIVATIONS[cell])
        if len(names) != n * nd:
            self._problem(node, f"needs {n * nd} activations, got {len(names)}")
            return None
        alphas, betas = list(a.get("activation_alpha", [])), list(a.get("activation_beta", []))
        out = []
        for name in names:
            key = name.lower()
            if key not in fmt.ACTIVATIONS:
                self._problem(node, f"unknown activation {name!r}")
                return None
            use_a, use_b = ACT_ARGS.get(key, (0, 0))
            alpha = alphas.pop(0) if use_a and alphas else None
            beta = betas.pop(0) if use_b and betas else None
            out.append(fmt.activation(key, alpha, beta))
        return [out[d * n:(d + 1) * n] for d in range(nd)]

    def _sequence(self, node: onnx.NodeProto, x, lay: int, in_size: int) -> bool:
        """Check that X is the previous stage's output laid out as (T, B, F) (layout 1: (B, T, F))."""
        if not isinstance(x, _Stream) or x.kind != "feat":
            what = "token ids need an embedding Gather first" if isinstance(x, _Stream) and x.kind == "ids" \
                else "X must be the input sequence or the previous layer's output"
            return self._problem(node, what) and False
        if x.stage != len(self.layers):
            return self._problem(node, "X is not the previous layer's output (layers must form one chain)") and False
        axes = [self._strip(ax) for ax in x.axes]
        if len(axes) != 3 or any(len(ax) != 1 or not ax[0].startswith("in") for ax in axes[:2]):
            return self._problem(node, f"X's axes {self._describe(x.axes)} are not (time, batch, features) "
                                 "for this node's layout") and False
        tb = (axes[0][0], axes[1][0]) if lay == 0 else (axes[1][0], axes[0][0])
        if self.tb is None:
            self.tb = tb
            self.notes["batch_first"] = tb[0] != "in0"
        elif self.tb != tb:
            return self._problem(node, "X swaps time and batch relative to the previous layer") and False
        if list(axes[2]) != self.feat:
            return self._problem(node, "X's features are not the previous stage's output in order "
                                 "(forward, then backward)") and False
        if len(self.feat) == 1 and self.sizes.get(self.feat[0]) is None:
            self.sizes[self.feat[0]] = in_size
        if math.prod(self.sizes[f] for f in self.feat) != in_size:
            return self._problem(node, f"X has {math.prod(self.sizes[f] for f in self.feat)} features, W expects "
                                 f"{in_size}") and False
        return True

    def _state(self, node: onnx.NodeProto, lens, states: list) -> None:
        if lens is None or isinstance(lens, _Side):
            self.lens.append(None if lens is None else lens.source)
        else:
            self._problem(node, "sequence_lens must be a graph input (the engine takes lengths at run time)")
        for v in states:
            if v is None or (isinstance(v, _Fill) and v.value == 0) or (isinstance(v, _Const) and not v.arr.any()):
                continue
            if isinstance(v, _Side):
                self.notes.setdefault("state_inputs", [])
                if v.source not in self.notes["state_inputs"]:
                    self.notes["state_inputs"].append(v.source)
            elif isinstance(v, (_Const, _Fill)):
                self._problem(node, "constant non-zero initial state: the engine takes the initial state at run "
                              "time (Model.run(x, state)); make it a graph input or zeros")
            else:
                self._problem(node, "initial_h / initial_c must be zeros or come from a graph input")

    def _head(self, node: onnx.NodeProto, ins: list):
        x = ins[0]
        if x.kind != "feat" or not self.layers or x.stage != len(self.layers) or self.head is not None:
            return self._problem(node, "a linear head must follow the last recurrent layer, once")
        if list(self._strip(x.axes[-1])) != self.feat or any(not isinstance(v, _Const) for v in ins[1:] if v):
            return self._problem(node, "a linear head needs the last layer's features as the last axis and "
                                 "constant weights")
        a = _attrs(node)
        w = np.asarray(ins[1].arr, np.float64)
        bias = None
        if node.op_type == "Gemm":
            if a.get("transA", 0) or len(x.axes) != 2:
                return self._problem(node, "Gemm head needs a 2-D input and transA=0")
            w = w.T if a.get("transB", 0) else w
            w = w * a.get("alpha", 1.0)
            if len(ins) > 2 and ins[2] is not None:
                bias = np.asarray(ins[2].arr, np.float64) * a.get("beta", 1.0)
        feats = math.prod(self.sizes[f] for f in self.feat)
        if w.ndim != 2 or w.shape[0] != feats:
            return self._problem(node, f"head weight shape {list(w.shape)} does not take {feats} features")
        self.head = {"w": w.T, "b": None}
        self.sizes["K"] = w.shape[1]
        out = _Stream(x.axes[:-1] + [("K",)], "head", x.stage)
        return out if bias is None else self._add_bias(node, out, bias)

    def _bias(self, node: onnx.NodeProto, ins: list):
        s = [v for v in ins if isinstance(v, _Stream)]
        c = [v for v in ins if isinstance(v, _Const)]
        if len(s) != 1 or len(c) != 1 or s[0].kind != "head":
            return self._problem(node, "Add on the data path is only supported as the head's bias")
        return self._add_bias(node, s[0], np.asarray(c[0].arr, np.float64))

    def _add_bias(self, node: onnx.NodeProto, out: _Stream, bias: np.ndarray):
        k = self.sizes["K"]
        lone = bias.ndim == 0 or bias.shape[-1] == bias.size  # every axis but the last has size 1
        if self._strip(out.axes[-1]) != ("K",) or bias.size not in (1, k) or not lone or bias.ndim > len(out.axes):
            return self._problem(node, f"head bias of shape {list(bias.shape)} does not broadcast over {k} outputs")
        b = np.broadcast_to(bias.reshape(-1), (k,))
        self.head["b"] = b if self.head["b"] is None else self.head["b"] + b
        return out

    def _softmax(self, node: onnx.NodeProto, x: _Stream):
        axis = _attrs(node).get("axis", -1 if self.opset >= 13 else 1)
        axis = axis + len(x.axes) if isinstance(x, _Stream) and axis < 0 else axis
        if not isinstance(x, _Stream) or x.kind != "head" or axis != len(x.axes) - 1 \
                or self._strip(x.axes[-1]) != ("K",):
            return self._problem(node, "Softmax / LogSoftmax only over the head's outputs (last axis)")
        self.notes["final"] = "log_softmax" if node.op_type == "LogSoftmax" else "softmax"
        return _Stream(x.axes, "probs", x.stage)

    # ------------------------------------------------------------------ shape glue
    def _glue(self, node: onnx.NodeProto, ins: list):
        op = node.op_type
        a = _attrs(node)
        present = [v for v in ins if v is not None]
        if op == "Shape":
            return self._shape(node, ins[0], a)
        if present and all(isinstance(v, _Const) for v in present):
            try:
                arr = _fold(op, a, [None if v is None else v.arr for v in ins], self.opset)
            except (ValueError, IndexError, TypeError, KeyError) as err:
                return self._problem(node, f"cannot fold constant ({str(err).splitlines()[0] if str(err) else err!r})")
            if arr is None:
                return self._problem(node, "constant too large to fold")
            return _Const(arr)
        data = ins[0]
        if op == "Concat":
            return self._concat(node, present, a)
        if op == "ConstantOfShape":
            v = _tensor(a["value"], self.path.parent, str(self.path)).reshape(-1) if "value" in a else [0.0]
            return _Fill(float(v[0]))
        if isinstance(data, _Stream):
            out = self._stream_glue(node, data, ins, a)
            return out if out is not None else self._problem(
                node, f"unsupported shape glue on the data path (axes {self._describe(data.axes)})")
        if isinstance(data, _Dims):
            out = self._dims_glue(op, data, ins, a)
            return out if out is not None else self._problem(node, "unsupported shape computation")
        if isinstance(data, (_Fill, _Side, _Final)) and op in SHAPE_OPS:
            return data
        if isinstance(data, _Const) and op == "Expand":
            flat = data.arr.reshape(-1)
            if flat.size and (flat == flat[0]).all():
                return _Fill(float(flat[0]))
        return self._problem(node, "unsupported combination of inputs")

    def _shape(self, node: onnx.NodeProto, x, a: dict):
        if isinstance(x, _Const):
            items = list(x.arr.shape)
        elif isinstance(x, _Stream):
            items = list(x.axes)
        else:
            return _Dims(None)
        items = items[slice(a.get("start", 0), a.get("end"))]
        return _Const(np.array(items, np.int64)) if all(isinstance(i, int) for i in items) else _Dims(items)

    def _concat(self, node: onnx.NodeProto, ins: list, a: dict):
        kinds = {type(v) for v in ins}
        if kinds <= {_Dims, _Const} and _Dims in kinds:
            items = []
            for v in ins:
                if isinstance(v, _Dims) and (v.items is None or v.scalar):
                    return self._problem(node, "unsupported shape computation")
                items += v.items if isinstance(v, _Dims) else [int(i) for i in v.arr.reshape(-1)]
            return _Dims(items)
        if kinds <= {_Fill, _Const}:
            vals = {v.value for v in ins if isinstance(v, _Fill)} | {
                float(x) for v in ins if isinstance(v, _Const) for x in np.unique(v.arr)}
            if len(vals) == 1:
                return _Fill(vals.pop())
        if kinds == {_Final}:
            return _Final()
        if kinds == {_Side}:
            return _Side("+".join(dict.fromkeys(v.source for v in ins)))
        return self._problem(node, "Concat is only supported on shapes, constants and final states")

    def _int_arg(self, ins: list, index: int, a: dict, key: str) -> list[int] | None | bool:
        """An int-list argument: attribute (old opsets) or constant input (new); False if not constant."""
        if key in a:
            return list(a[key])
        if len(ins) > index and ins[index] is not None:
            return [int(i) for i in ins[index].arr.reshape(-1)] if isinstance(ins[index], _Const) else False
        return None

    def _stream_glue(self, node: onnx.NodeProto, x: _Stream, ins: list, a: dict) -> _Stream | None:
        op, axes, rank = node.op_type, x.axes, len(x.axes)
        if op in ("Identity", "Dropout"):
            mode = ins[2] if len(ins) > 2 else None
            return x if mode is None or (isinstance(mode, _Const) and not mode.arr.any()) else None
        if op == "Cast":
            to = a.get("to")
            return x if (to in FLOATS) == (x.kind != "ids") and (to in FLOATS or to in INTS) else None
        if op == "Transpose":
            perm = a.get("perm", list(range(rank))[::-1])
            return _Stream([axes[p] for p in perm], x.kind, x.stage) if sorted(perm) == list(range(rank)) else None
        if op == "Squeeze":
            sel = self._int_arg(ins, 1, a, "axes")
            if sel is False:
                return None
            sel = [i for i, ax in enumerate(axes) if not self._strip(ax)] if sel is None else [s % rank for s in sel]
            if any(self._strip(axes[i]) for i in sel):
                return None
            return _Stream([ax for i, ax in enumerate(axes) if i not in sel], x.kind, x.stage)
        if op == "Unsqueeze":
            sel = self._int_arg(ins, 1, a, "axes")
            if not sel:
                return None
            out_rank = rank + len(sel)
            sel = sorted(s % out_rank for s in sel)
            out = list(axes)
            for s in sel:
                out.insert(s, (self._unit(),))
            return _Stream(out, x.kind, x.stage)
        if op == "Flatten":
            k = a.get("axis", 1) + (rank if a.get("axis", 1) < 0 else 0)
            merge = lambda part: tuple(at for ax in part for at in ax) or (self._unit(),)
            return _Stream([merge(axes[:k]), merge(axes[k:])], x.kind, x.stage)
        if op == "Reshape":
            shape = ins[1]
            if isinstance(shape, _Const):
                target = [int(i) for i in shape.arr.reshape(-1)]
            elif isinstance(shape, _Dims) and shape.items is not None and not shape.scalar:
                target = list(shape.items)
            else:
                return None
            out = self._reshape(axes, target, bool(a.get("allowzero", 0)))
            return None if out is None else _Stream(out, x.kind, x.stage)
        return None

    def _dims_glue(self, op: str, x: _Dims, ins: list, a: dict) -> _Dims | None:
        if x.items is None or op in ("Identity", "Cast"):
            return x
        if op == "Gather" and isinstance(ins[1], _Const) and a.get("axis", 0) == 0 and not x.scalar:
            idx = ins[1].arr
            picked = [x.items[int(i)] for i in idx.reshape(-1)]
            return _Dims(picked, scalar=idx.ndim == 0)
        if op == "Unsqueeze" and x.scalar:
            return _Dims(x.items)
        if op == "Squeeze" and not x.scalar and len(x.items) == 1:
            return _Dims(x.items, scalar=True)
        if op == "Slice" and not x.scalar:
            starts, ends = self._int_arg(ins, 1, a, "starts"), self._int_arg(ins, 2, a, "ends")
            axes, steps = self._int_arg(ins, 3, a, "axes"), self._int_arg(ins, 4, a, "steps")
            if not starts or not ends or axes not in (None, [0], [-1]) or steps not in (None, [1]):
                return None
            return _Dims(x.items[starts[0]:ends[0]])
        return None

    # ------------------------------------------------------------------ axis algebra
    def _unit(self) -> str:
        name = f"u{len(self.units)}"
        self.units.add(name)
        self.sizes[name] = 1
        return name

    def _strip(self, ax: tuple) -> tuple:
        return tuple(at for at in ax if at not in self.units)

    def _take(self, atoms: list, items: list) -> tuple[list, list] | None:
        """Match reshape targets against the front of ``atoms``: (axes, atoms left) or None."""
        out, pos = [], 0
        for it in items:
            if isinstance(it, tuple):
                if tuple(atoms[pos:pos + len(it)]) != it:
                    return None
                out.append(it)
                pos += len(it)
            elif it == 1:
                out.append((self._unit(),))
            else:
                start, prod = pos, 1
                while prod < it and pos < len(atoms) and self.sizes.get(atoms[pos]) is not None:
                    prod *= self.sizes[atoms[pos]]
                    pos += 1
                if prod != it or pos == start:
                    return None
                out.append(tuple(atoms[start:pos]))
        return out, atoms[pos:]

    def _reshape(self, axes: list, target: list, allowzero: bool) -> list | None:
        items = []
        for i, t in enumerate(target):
            if isinstance(t, tuple):
                items.append(self._strip(t) or 1)
            elif t == 0 and not allowzero:
                if i >= len(axes):
                    return None
                items.append(self._strip(axes[i]) or 1)
            elif t == -1 or t > 0:
                items.append(t)
            else:
                return None
        atoms = [at for ax in axes for at in self._strip(ax)]
        if items.count(-1) > 1:
            return None
        if -1 not in items:
            got = self._take(atoms, items)
            return None if got is None or got[1] else got[0]
        k = items.index(-1)
        front = self._take(atoms, items[:k])
        if front is None:
            return None
        back_items = [it[::-1] if isinstance(it, tuple) else it for it in reversed(items[k + 1:])]
        back = self._take(front[1][::-1], back_items)
        if back is None:
            return None
        middle = tuple(back[1][::-1]) or (self._unit(),)
        return front[0] + [middle] + [ax[::-1] for ax in reversed(back[0])]

    def _describe(self, axes: list) -> list[str]:
        """Axes as names: T, B (the input's time and batch), E, D, H, K, I; merged axes joined with '*'."""
        t, b = self.tb or (None, None)

        def one(at: str) -> str:
            return "T" if at == t else "B" if at == b else at.rstrip("0123456789") or at

        return ["*".join(one(at) for at in self._strip(ax)) or "1" for ax in axes]

    # ------------------------------------------------------------------ the result
    def _finish(self) -> dict:
        if not self.layers:
            if self.problems:
                return {}
            self._fail("no LSTM, GRU or RNN node feeds a graph output")
        main = []
        for o in self.graph.output:
            v = self.values.get(o.name)
            if isinstance(v, _Final) or v is BAD:
                continue
            if isinstance(v, _Stream) and (v.kind in ("head", "probs") or (v.kind == "feat" and self.head is None
                                                                            and v.stage == len(self.layers))):
                main.append((o.name, v))
            else:
                self._problem(None, f"graph output '{o.name}' is not the model's output sequence or final state")
        if len(main) > 1:
            self._problem(None, f"graph outputs {', '.join(n for n, _ in main)}: the engine produces one sequence")
        if main:
            self.notes["output"] = main[0][0]
            self.notes["output_axes"] = self._describe(main[0][1].axes)
        if len(set(self.lens)) > 1:
            self._problem(None, "sequence_lens must be the same graph input for every layer (or absent everywhere)")
        if self.lens and self.lens[0]:
            self.notes["sequence_lens"] = self.lens[0]
        if self.problems:
            return {}
        emb = self.tensors.get("embedding")
        head_cfg = None
        if self.head is not None:
            w = np.asarray(self.head["w"], F32)
            tied = emb is not None and emb.shape == w.shape and np.array_equal(emb, w)
            if not tied:
                self.tensors["head.weight"] = w
            if self.head["b"] is not None:
                self.tensors["head.bias"] = np.asarray(self.head["b"], F32)
            head_cfg = {"output_size": w.shape[0], "input_size": w.shape[1], "tied": bool(tied),
                        "bias": self.head["b"] is not None}
        emb_cfg = None if emb is None else {"vocab_size": emb.shape[0], "dim": emb.shape[1]}
        config = fmt.make_config(self.layers, embedding=emb_cfg, head=head_cfg, tokenizer=None)
        fmt.validate_config(config, str(self.path))
        for name, arr in self.tensors.items():
            if not np.isfinite(arr).all():
                self._fail(f"the weights for '{name}' hold NaN or Inf values")
        return config


def _name(node: onnx.NodeProto) -> str:
    return (node.name or f"{node.op_type} -> {node.output[0] if node.output else '?'}").replace("\n", " ")


# --------------------------------------------------------------------------- constant folding

# Ops that only move or select elements: on a run-time-only value (zeros, state) they change nothing we track.
SHAPE_OPS = {"Identity", "Cast", "Dropout", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Slice",
             "Gather", "Expand"}
ARITH = {"Add", "Sub", "Mul", "Div", "MatMul", "Gemm"}
GLUE = SHAPE_OPS | ARITH | {"Concat", "Shape", "ConstantOfShape"}
HANDLERS = {"Gather", "Softmax", "LogSoftmax"} | ARITH


def _fold(op: str, a: dict, x: list, opset: int) -> np.ndarray | None:
    """Evaluate a glue op on constants with NumPy (ONNX semantics); None if the result is too large."""
    d = x[0]

    def arg(i: int, key: str):
        return list(a[key]) if key in a else ([int(v) for v in x[i].reshape(-1)] if len(x) > i and x[i] is not None
                                              else None)

    if op in ("Identity", "Dropout"):
        return d
    if op == "Cast":
        return d.astype(helper.tensor_dtype_to_np_dtype(a["to"]))
    if op == "Transpose":
        return np.transpose(d, a.get("perm"))
    if op == "Reshape":
        shape = [int(s) for s in x[1].reshape(-1)]
        if not a.get("allowzero", 0):
            shape = [d.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return d.reshape(shape)
    if op == "Squeeze":
        axes = arg(1, "axes")
        return np.squeeze(d, tuple(axes)) if axes is not None else np.squeeze(d)
    if op == "Unsqueeze":
        return np.expand_dims(d, tuple(arg(1, "axes")))
    if op == "Flatten":
        k = a.get("axis", 1) + (d.ndim if a.get("axis", 1) < 0 else 0)
        return d.reshape(math.prod(d.shape[:k]), -1)
    if op == "Slice":
        starts, ends = arg(1, "starts"), arg(2, "ends")
        axes = arg(3, "axes") or list(range(len(starts)))
        steps = arg(4, "steps") or [1] * len(starts)
        sl = [slice(None)] * d.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            sl[ax] = slice(s, e, st)
        return d[tuple(sl)]
    if op == "Gather":
        return np.take(d, x[1], axis=a.get("axis", 0))
    if op == "Concat":
        return np.concatenate([v for v in x if v is not None], axis=a["axis"])
    if op in ("ConstantOfShape", "Expand"):
        shape = [int(s) for s in (d if op == "ConstantOfShape" else x[1]).reshape(-1)]
        if op == "Expand":
            shape = list(np.broadcast_shapes(d.shape, tuple(shape)))
        if math.prod(shape) > MAX_CONST:
            return None
        if op == "Expand":
            return np.broadcast_to(d, shape).copy()
        value = numpy_helper.to_array(a["value"]).reshape(-1) if "value" in a else np.zeros(1, F32)
        return np.full(shape, value[0], value.dtype)
    if op in ("Add", "Sub", "Mul", "MatMul"):
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "MatMul": np.matmul}[op](d, x[1])
    if op == "Div":
        if np.issubdtype(d.dtype, np.integer):
            return np.trunc(d / x[1]).astype(d.dtype)
        return d / x[1]
    raise ValueError(f"no folding rule for {op}")
