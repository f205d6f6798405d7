"""``Model``: a loaded model directory and the Python API over the engine."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import eager
from .errors import LstmInferError
from .format import read_model
from .layers import build_layers, zero_state
from .tokenizer import Tokenizer
from .workers import Workers

if TYPE_CHECKING:
    from threadpoolctl import ThreadpoolController

# Numba (with head.py, recurrent.py and every kernel) is imported on first use, not here: a short job
# with jit=False never needs it (eager.py says what that saves).

F32 = np.float32
DEFAULT_MODEL = Path(__file__).parent / "data" / "default"

State = tuple[Any, Any]


class _BlasLimit:
    """The process-wide BLAS thread limit, shared by the calls in flight: the first sets it, the last restores it.

    threadpoolctl's limit() saves and restores a process-wide setting; calls from several threads that each
    did so would restore one another's values out of order and leave the process with a wrong thread count.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.users = 0
        self.limiter = None
        self.controller: ThreadpoolController | None = None

    @contextlib.contextmanager
    def __call__(self, threads: int):
        with self.lock:
            if self.users == 0:
                from threadpoolctl import ThreadpoolController

                self.controller = self.controller or ThreadpoolController()
                self.limiter = self.controller.limit(limits=threads, user_api="blas")
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    self.limiter.restore_original_limits()


_BLAS = _BlasLimit()
_WORKQUEUE = threading.RLock()  # Numba's workqueue layer aborts the process when two threads launch kernels at once


def _unsafe_layer() -> bool:
    """True under Numba's workqueue threading layer (no TBB, no OpenMP), or before any layer is chosen."""
    import numba

    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:  # chosen at the first parallel launch: until then, assume the worst
        return True


class Model:
    """A model directory mapped into memory. Arrays are shared, so one Model serves many threads.

    ``state`` everywhere is PyTorch's pair ``(h, c)``: h (L*D, B, H_out), c (L*D, B, H), c None for
    GRU/RNN stacks. Stacks whose layers differ in size or cell use lists of per-layer-direction
    arrays, h[k] (B, H_out_k) and c[k] (B, H_k), in the same order.
    """

    def __init__(self, config: dict, tensors: dict[str, np.ndarray], vocab: list[str] | None = None,
                 *, path: str | os.PathLike | None = None, threads: int | None = None, jit: bool = True):
        self.config = config
        self.vocab = vocab
        self.path = Path(path) if path is not None else None
        limit = _thread_limit()
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise LstmInferError(f"threads must be a positive integer, got {threads!r}")
        self.threads = min(threads or limit, limit)
        self.workers = Workers(self.threads)
        # Plain ndarray views of the mapped files, still zero-copy: every view of an np.memmap (a .T per
        # step) runs memmap.__array_finalize__ in Python, ~3 us each, which batch-1 steps notice.
        tensors = {k: v.view(np.ndarray) for k, v in tensors.items()}
        self.layers = build_layers(config, tensors)
        self.embedding = tensors.get("embedding")
        hc = config["head"]
        self.head_w = None if hc is None else (self.embedding if hc["tied"] else tensors["head.weight"])
        self.head_b = tensors.get("head.bias")
        tok = config["tokenizer"]
        self.tokenizer = Tokenizer.from_config(tok, vocab) if tok is not None else None
        self._uniform = len({(ly.cell, ly.out, ly.hidden) for ly in self.layers}) == 1
        self._table = None  # layer 0's input projection per token (_token_table)
        self._table_lock = threading.Lock()
        self._eager = not jit and eager.fits(self.layers)  # target_log_probs in NumPy (one-shot short jobs)

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _threads(self):
        """Numba (per calling thread) gets ``threads``; BLAS (process-wide, see _BlasLimit) one thread, since
        self.workers split the GEMMs (workers.py says why): never oversubscribed."""
        with _BLAS(1), self._kernel_launches():
            yield

    @contextlib.contextmanager
    def _kernel_launches(self):
        """What every launch of compiled kernels needs: Numba's thread count (capped by Numba's own limit,
        which _thread_limit mirrors) and, under the workqueue layer, the lock (_WORKQUEUE). The compiled
        decoder takes only this: it uses no BLAS, and threadpoolctl's limit costs ~0.1 ms a streamed token."""
        import numba

        numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        with _WORKQUEUE if _unsafe_layer() else contextlib.nullcontext():
            yield

    @property
    def vocab_size(self) -> int | None:
        return None if self.embedding is None else self.embedding.shape[0]

    def _require_lm(self, what: str) -> None:
        if self.embedding is None or self.head_w is None:
            raise LstmInferError(f"{what} needs a model with an embedding and an output head")

    def _ids(self, ids: Any, ndim: int, name: str = "ids") -> np.ndarray:
        try:
            arr = np.asarray(ids)
        except (ValueError, TypeError):  # ragged nested lists
            raise LstmInferError(f"{name} must be an integer array with {ndim} dimension(s), got ragged rows") from None
        if arr.ndim != ndim or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise LstmInferError(
                f"{name} must be an integer array with {ndim} dimension(s), got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.int64, copy=False)
        v = self.vocab_size
        if arr.size and (arr.min() < 0 or arr.max() >= v):
            bad = arr[(arr < 0) | (arr >= v)].flat[0]
            raise LstmInferError(f"{name}: token id {bad} is out of range [0, {v})")
        return arr

    def _valid(self, T: int, B: int, lengths: Any) -> np.ndarray:
        if lengths is None:
            return np.ones((T, B), np.bool_)
        ln = np.asarray(lengths)
        if ln.shape != (B,) or not np.issubdtype(ln.dtype, np.integer) or (ln.size and (ln.min() < 0 or ln.max() > T)):
            raise LstmInferError(f"lengths must be {B} integers in [0, {T}], got {ln.dtype} {ln.shape}")
        return np.arange(T)[:, None] < ln[None, :]

    def _state_in(self, state: State | None, B: int) -> list:
        fresh = zero_state(self.layers, B)
        if state is None:
            return fresh
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise LstmInferError("state must be a pair (h, c); c is None for GRU/RNN models")
        hs, cs = state
        for k, (h0, c0) in enumerate(fresh):
            for name, src, dst in (("h", hs, h0), ("c", cs, c0)):
                if dst is None:
                    continue
                if src is None:
                    raise LstmInferError(f"state {name} is None but the model needs it")
                part = np.asarray(src[k], F32) if len(src) == len(fresh) else None
                if part is None or part.shape != dst.shape:
                    want = dst.shape if not self._uniform else (len(fresh),) + dst.shape
                    raise LstmInferError(f"state {name} must have shape {want}")
                dst[...] = part
        return fresh

    def _state_out(self, st: list) -> State:
        hs = [h for h, _ in st]
        cs = [c for _, c in st]
        if any(c is None for c in cs):
            cs = None if all(c is None for c in cs) else cs
        if self._uniform:
            return np.stack(hs), (np.stack(cs) if cs is not None else None)
        return hs, cs

    def _forward(self, x: np.ndarray | None, state: State | None, lengths: Any, ids: np.ndarray | None = None,
                 fm_last: bool = False, keep: bool = True, table=None) -> tuple[np.ndarray, list]:
        """x (T, B, I), or ids (T, B) with x None when layer 0 reads ``table`` (filled for them); see run_stack's
        fm_last, and its keep_last for ``keep``."""
        from . import recurrent

        T, B = (x if x is not None else ids).shape[:2]
        st = self._state_in(state, B)
        valid = self._valid(T, B, lengths)
        if T == 0 or B == 0:  # nothing to run; the kernels' reshape(-1) cannot size an empty batch
            return np.zeros((T, B, self.layers[-1].output_size), F32), st
        with self._threads():
            tokens = None if x is not None else (ids, table)
            out = recurrent.run_stack(self.layers, x, st, valid, self.workers, tokens, fm_last, keep)
        return out, st

    def _forward_ids(self, ids: np.ndarray, state: State | None, lengths: Any, fm_last: bool = False,
                     keep: bool = True) -> tuple[np.ndarray, list]:
        """_forward from token ids: through the layer-0 token table where there is one."""
        table = self._token_table()
        if table is not None:
            table.fill(ids, self.workers)
            return self._forward(None, state, lengths, ids, fm_last, keep, table)
        return self._forward(self._embed(ids), state, lengths, fm_last=fm_last, keep=keep)

    def _token_table(self):
        """Layer 0's recurrent.TokenTable, made empty on first use; None where it does not fit (table_fits)."""
        from . import recurrent

        with self._table_lock:  # one table, whichever of scoring, step and generate comes first
            if self._table is None and recurrent.table_fits(self.layers, self.vocab_size):
                self._table = recurrent.token_table(self.layers[0], self.vocab_size, self.embedding)
        return self._table

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return np.take(self.embedding, ids, axis=0)

    # ------------------------------------------------------------------ public API
    def run(self, inputs: Any, state: State | None = None, lengths: Any = None,
            batch_first: bool = False) -> tuple[np.ndarray, State]:
        """Recurrent stack only: inputs (T, B, I) float32 -> outputs (T, B, D*H_out), state."""
        x = np.asarray(inputs, F32)
        want = self.layers[0].input_size
        if x.ndim != 3 or x.shape[2] != want:
            raise LstmInferError(f"inputs must have shape ({'B, T' if batch_first else 'T, B'}, {want}), got {x.shape}")
        if batch_first:
            x = x.transpose(1, 0, 2)
        out, st = self._forward(np.ascontiguousarray(x), state, lengths)
        if batch_first:
            out = np.ascontiguousarray(out.transpose(1, 0, 2))
        return out, self._state_out(st)

    def logits(self, ids: Any, state: State | None = None, lengths: Any = None) -> tuple[np.ndarray, State]:
        """ids (T, B) -> logits (T, B, K), state."""
        from . import head

        self._require_lm("logits")
        ids = self._ids(ids, 2)
        feats, st = self._forward_ids(ids, state, lengths)
        T, B = ids.shape
        with self._threads():
            out = head.logits(feats.reshape(T * B, feats.shape[2]), self.head_w, self.head_b, self.workers)
        return out.reshape(T, B, out.shape[1]), self._state_out(st)

    def log_probs(self, ids: Any, state: State | None = None, lengths: Any = None) -> tuple[np.ndarray, State]:
        """ids (T, B) -> log-probabilities (T, B, K), state."""
        from . import head

        self._require_lm("log_probs")
        ids = self._ids(ids, 2)
        feats, st = self._forward_ids(ids, state, lengths)
        T, B = ids.shape
        with self._threads():
            out = head.log_probs(feats.reshape(T * B, feats.shape[2]), self.head_w, self.head_b, self.workers)
        return out.reshape(T, B, out.shape[1]), self._state_out(st)

    def step(self, ids: Any, state: State | None = None) -> tuple[np.ndarray, State]:
        """One token per row: ids (B,) -> log-probabilities (B, K) of the next token, state.

        Runs on the compiled decoder's network where it covers the model, otherwise through the layers like
        log_probs. The first call builds that network as the first generate does: a copy of the recurrent
        weights, the head in panels (up to decoding.TABLE_BYTES), and layer 0's projection of every token
        (an LSTM's: the scoring path's token table, filled whole up to decoding.TABLE_BYTES, else a row per
        new token)."""
        from . import decoding

        self._require_lm("step")
        ids = self._ids(ids, 1)
        if ids.size:
            out = decoding.step(self, ids, state)
            if out is not None:
                return out
        return self._step_layers(ids, state)

    def _step_layers(self, ids: np.ndarray, state: State | None = None) -> tuple[np.ndarray, State]:
        """step() through the layers' kernels and the head (log_probs of one time step); ids (B,) int."""
        lp, st = self.log_probs(ids[None, :], state)
        return lp[0], st

    def target_log_probs(self, inputs: Any, targets: Any, state: State | None = None,
                         lengths: Any = None) -> tuple[np.ndarray, State]:
        """lp[t, b] = log P(targets[t, b] | inputs[:t+1, b]); inputs, targets (T, B) -> lp (T, B).

        The (T, B, K) logits are never materialised. Positions past a row's length get 0.
        """
        self._require_lm("target_log_probs")
        ids = self._ids(inputs, 2, "inputs")
        tg = self._ids(targets, 2, "targets")
        if tg.shape != ids.shape:
            raise LstmInferError(f"targets shape {tg.shape} differs from inputs shape {ids.shape}")
        T, B = ids.shape
        lp, st = self._target_log_probs_eager(ids, tg, state, lengths) if self._eager else \
            self._target_log_probs_kernels(ids, tg, state, lengths)
        if lengths is not None:
            lp[~self._valid(T, B, lengths)] = 0.0
        return lp, self._state_out(st)

    def _target_log_probs_kernels(self, ids: np.ndarray, tg: np.ndarray, state: State | None,
                                  lengths: Any) -> tuple[np.ndarray, list]:
        """(lp (T, B), state list) through the layers' kernels and the fused head."""
        from . import head, recurrent

        T, B = ids.shape
        # A small head reads the last layer's output feature-major, as its GEMM wants it (head.py)
        fm = T * B > 0 and recurrent.feature_major(self.layers[-1], B) and head.fm_fits(self.head_w, T)
        feats, st = self._forward_ids(ids, state, lengths, fm, keep=False)  # the head consumes it here
        with self._threads():
            if fm:
                return head.target_log_probs_fm(feats, B, self.head_w, self.head_b, tg), st
            return head.target_log_probs(feats.reshape(T * B, feats.shape[2]), self.head_w, self.head_b,
                                         tg.reshape(-1), self.workers).reshape(T, B), st

    def _target_log_probs_eager(self, ids: np.ndarray, tg: np.ndarray, state: State | None,
                                lengths: Any) -> tuple[np.ndarray, list]:
        """(lp (T, B), state list) in NumPy (eager.py), BLAS on ``threads`` threads. Not the kernels' policy
        (BLAS on one thread, the workers splitting each product): for batch-1 steps OpenBLAS's own threads were
        faster, 0.25-0.28 against 0.36-0.40 s for a 128-token line of the 1500-unit model. A kernel call in
        flight at the same time shares BLAS's process-wide limit with this one (_BlasLimit): whichever came
        first sets it."""
        T, B = ids.shape
        st = self._state_in(state, B)
        with _BLAS(self.threads):
            feats = eager.run_stack(self.layers, self._embed(ids), st, self._valid(T, B, lengths))
            lp = eager.target_log_probs(feats.reshape(T * B, feats.shape[2]), self.head_w, self.head_b,
                                        tg.reshape(-1))
        return lp.reshape(T, B), st

    def score(self, text_or_lines: str | list[str], mode: str = "sentences", *, batch_size: int = 64,
              per_token: bool = False):
        """Perplexity of a text (lines split on \\n) or a list of lines -> scoring.ScoreResult.

        Totals as ``lstm-infer score`` prints them, and ``.lines`` in input order (see scoring.py for the
        sentences / stream semantics).
        """
        from .scoring import score_text

        return score_text(self, text_or_lines, mode, batch_size, per_token)

    def generate(self, prompt: str | list[str] | None = None, **options: Any) -> list:
        """Continue a text (or each of a list): greedy, beam or sampled; options in decoding.generate."""
        from .decoding import generate

        return generate(self, prompt, **options)

    def generate_ids(self, prompt_ids: Any = None, **options: Any) -> list:
        """generate() on token ids (a list of ints, or a list of such lists)."""
        from .decoding import generate_ids

        return generate_ids(self, prompt_ids, **options)

    def generate_tokens(self, prompt: str | None = None, **options: Any):
        """A generator of text pieces as greedy or sampled tokens come; options in decoding.generate."""
        from .decoding import generate_tokens

        return generate_tokens(self, prompt, **options)


def _thread_limit() -> int:
    """Numba's thread limit (numba.config.NUMBA_NUM_THREADS), worked out the same way without importing it."""
    env = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else max(1, os.cpu_count() or 1)


def load(path: str | os.PathLike | None = None, *, threads: int | None = None, jit: bool = True) -> Model:
    """Map a model directory (None: the bundled default model). ``threads``: None = all cores. ``jit=False``:
    target_log_probs runs in NumPy where the stack allows (eager.py), for one-shot jobs too short to pay
    for Numba's start-up."""
    where = DEFAULT_MODEL if path is None else Path(path)
    if path is None and not (where / "config.json").exists():
        raise LstmInferError(f"{where}: the bundled default model is missing from this installation")
    config, tensors, vocab = read_model(where)
    return Model(config, tensors, vocab, path=where, threads=threads, jit=jit)
