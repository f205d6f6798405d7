"""The engines under test, one class each, behind one interface (every array is time-major).

    score(inputs, targets)   inputs, targets (T, B) int64 -> target log-probs (T, B) float32
                             (logits -> log_softmax -> gather of the targets' log-probs)
    greedy(start, n)         n tokens of greedy decoding from one start token (no stop at EOS) -> list of ids
    beam(start, k, n)        beam search of width k for n steps (no stop at EOS) -> the best beam's ids

Peers do what a user of that framework would write: PyTorch eager under inference_mode, ONNX Runtime and
OpenVINO running the exported graphs (score.onnx with log_softmax + gather inside; step.onnx / step_lp.onnx
one token at a time with the state fed back). Beam search is the straightforward loop over k rows with the
state reordered by back-pointer and a top-k over k * V.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ENGINES = ("lstm-infer", "pytorch", "onnxruntime", "openvino", "openvino-bf16")
LABELS = {"lstm-infer": "lstm-infer", "pytorch": "PyTorch", "onnxruntime": "ORT", "openvino": "OV f32",
          "openvino-bf16": "OV bf16 (default)"}
FP32_PEERS = ("pytorch", "onnxruntime", "openvino")


def beam_loop(step, reorder, start: int, k: int, n: int) -> list[int]:
    """Beam search over a step function: step(ids (k,), state) -> (log-probs (k, V), state).

    All k rows start from ``start``; only row 0 is live at first, so the first top-k is over distinct tokens.
    """
    scores = np.full(k, -np.inf)
    scores[0] = 0.0
    ids = np.full(k, start, np.int64)
    state = None
    back = np.empty((n, k), np.int64)
    toks = np.empty((n, k), np.int64)
    for t in range(n):
        lp, state = step(ids, state)
        total = (lp + scores[:, None]).ravel()
        top = np.argpartition(total, -k)[-k:]
        top = top[np.argsort(-total[top], kind="stable")]
        rows, ids = np.divmod(top, lp.shape[1])
        scores = total[top]
        state = reorder(state, rows)
        back[t], toks[t] = rows, ids
    return _backtrack(back, toks)


def _backtrack(back: np.ndarray, toks: np.ndarray) -> list[int]:
    """The best final beam's tokens: back (n, k) row of each beam's parent, toks (n, k) its last token."""
    j, seq = 0, []
    for t in range(back.shape[0] - 1, -1, -1):
        seq.append(int(toks[t, j]))
        j = int(back[t, j])
    return seq[::-1]


# --------------------------------------------------------------------------- lstm-infer

class LstmInfer:
    def __init__(self, model_dir: Path, threads: int, **_):
        import lstm_infer

        self.model = lstm_infer.load(model_dir, threads=threads)
        self.uses_generate = hasattr(self.model, "generate_ids")
        self.notes = [] if self.uses_generate else ["decoding: loop over Model.step (generate_ids not available)"]
        tok = self.model.tokenizer
        self.start_symbol = None if tok is None else tok.start_id

    def _generate(self, start: int, **options) -> list[int]:
        """generate_ids from ``start``: the model puts its start symbol in front itself, so pass no prompt then."""
        prompt = None if start == self.start_symbol else [start]
        if prompt is not None and self.start_symbol is not None:
            raise ValueError(f"decoding must start from the model's start symbol {self.start_symbol}, not {start}")
        return list(self.model.generate_ids(prompt, stop_at_eos=False, **options)[0].ids)

    def score(self, inputs, targets):
        return self.model.target_log_probs(inputs, targets)[0]

    def greedy(self, start, n):
        if self.uses_generate:
            return self._generate(start, method="greedy", max_new_tokens=n)
        tok, state, out = start, None, []
        for _ in range(n):
            lp, state = self.model.step(np.array([tok]), state)
            tok = int(lp[0].argmax())
            out.append(tok)
        return out

    def beam(self, start, k, n):
        if self.uses_generate:
            return self._generate(start, method="beam", beam_size=k, max_new_tokens=n)
        return beam_loop(self.model.step, lambda st, rows: (st[0][:, rows], st[1][:, rows]), start, k, n)

    def info(self) -> dict:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = "not initialised"
        return {"numba_threading_layer": layer, "generate_ids": self.uses_generate, "notes": self.notes}


# --------------------------------------------------------------------------- PyTorch

class Torch:
    def __init__(self, folder: Path, threads: int, spec, head_bias: bool = True, **_):
        import torch
        from models import torch_model

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        self.torch = torch
        self.lm = torch_model(spec, folder / "state.pt", head_bias)
        self.notes = []

    def score(self, inputs, targets):
        torch = self.torch
        with torch.inference_mode():
            logits, _ = self.lm(torch.from_numpy(inputs))
            lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.from_numpy(targets).unsqueeze(-1))
            return lp.squeeze(-1).numpy()

    def greedy(self, start, n):
        torch = self.torch
        out, state = [], None
        tok = torch.tensor([[start]])
        with torch.inference_mode():
            for _ in range(n):
                logits, state = self.lm(tok, state)
                tok = logits[0].argmax(-1, keepdim=True)
                out.append(int(tok))
        return out

    def beam(self, start, k, n):
        torch = self.torch
        with torch.inference_mode():
            scores = torch.full((k,), float("-inf"))
            scores[0] = 0.0
            ids = torch.full((1, k), start, dtype=torch.int64)
            state = None
            back, toks = [], []
            for _ in range(n):
                logits, (h, c) = self.lm(ids, state)
                total = (torch.log_softmax(logits[0], dim=-1) + scores[:, None]).view(-1)
                scores, top = total.topk(k)
                rows, tok = top // logits.shape[-1], top % logits.shape[-1]
                state = (h[:, rows], c[:, rows])
                ids = tok.view(1, k)
                back.append(rows)
                toks.append(tok)
        return _backtrack(torch.stack(back).numpy(), torch.stack(toks).numpy())

    def info(self) -> dict:
        return {"mkldnn": bool(self.torch.backends.mkldnn.is_available()), "notes": self.notes}


# --------------------------------------------------------------------------- graph runners (ORT, OpenVINO)

class _Graphs:
    """Shared decoding loops for engines that run score.onnx / step.onnx / step_lp.onnx."""

    layers: int
    hidden: int

    def _zeros(self, b: int):
        z = np.zeros((self.layers, b, self.hidden), np.float32)
        return z, z.copy()

    def _step(self, graph: str, ids: np.ndarray, state):
        """ids (B,) -> scores (B, V), (h, c) (L, B, H)."""
        h, c = state if state is not None else self._zeros(len(ids))
        scores, hn, cn = self._run(graph, {"ids": ids.reshape(1, -1), "h0": h, "c0": c})
        return scores[0], (hn, cn)

    def score(self, inputs, targets):
        return self._run("score", {"ids": inputs, "targets": targets})[0]

    def greedy(self, start, n):
        tok, state, out = np.array([start], np.int64), None, []
        for _ in range(n):
            logits, state = self._step("step", tok, state)
            tok = np.array([logits[0].argmax()], np.int64)
            out.append(int(tok[0]))
        return out

    def beam(self, start, k, n):
        return beam_loop(lambda ids, st: self._step("step_lp", ids, st),
                         lambda st, rows: (np.ascontiguousarray(st[0][:, rows]), np.ascontiguousarray(st[1][:, rows])),
                         start, k, n)


class OnnxRuntime(_Graphs):
    def __init__(self, folder: Path, threads: int, spec, **_):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = {g: ort.InferenceSession(str(folder / f"{g}.onnx"), so, providers=["CPUExecutionProvider"])
                         for g in ("score", "step", "step_lp")}
        self.layers, self.hidden = spec.layers, spec.hidden
        self.notes = []

    def _run(self, graph, feeds):
        return self.sessions[graph].run(None, feeds)

    def info(self) -> dict:
        return {"providers": self.sessions["score"].get_providers(), "notes": self.notes}


class OpenVino(_Graphs):
    """OpenVINO CPU plugin. ``precision`` "f32" forces fp32; None keeps the plugin's default (bf16 on AMX)."""

    def __init__(self, folder: Path, threads: int, spec, precision: str | None = "f32", **_):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = {g: core.compile_model(str(folder / f"{g}.onnx"), "CPU", config)
                         for g in ("score", "step", "step_lp")}
        self.requests = {g: c.create_infer_request() for g, c in self.compiled.items()}
        self.layers, self.hidden = spec.layers, spec.hidden
        self.notes = []

    def _run(self, graph, feeds):
        req = self.requests[graph]
        req.infer(feeds)
        # Copies: the request reuses its output buffers, and h/c feed the next call.
        return [req.get_output_tensor(i).data.copy() for i in range(len(self.compiled[graph].outputs))]

    def info(self) -> dict:
        c = self.compiled["score"]
        props = {}
        for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS"):
            try:
                props[key] = str(c.get_property(key))
            except RuntimeError:
                props[key] = "?"
        return {"properties": props, "notes": self.notes}


def make(engine: str, folder: Path, model_dir: Path, threads: int, spec, head_bias: bool = True):
    """The engine object for one worker."""
    kw = {"folder": folder, "model_dir": model_dir, "threads": threads, "spec": spec, "head_bias": head_bias}
    if engine == "lstm-infer":
        return LstmInfer(**kw)
    if engine == "pytorch":
        return Torch(**kw)
    if engine == "onnxruntime":
        return OnnxRuntime(**kw)
    if engine == "openvino":
        return OpenVino(**kw)
    if engine == "openvino-bf16":
        return OpenVino(**kw, precision=None)
    raise ValueError(f"unknown engine {engine!r} (known: {json.dumps(ENGINES)})")
