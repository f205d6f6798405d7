"""Scoring many files on a Dask cluster: the same totals as ``lstm-infer score``, spread over worker processes.

Work is cut into partitions. In sentences mode a partition is a byte range ``[start, end)`` of one file and
owns the lines that *start* in it: a worker seeks to ``start - 1``, skips to the next line start and reads
lines until the first one that starts at or after ``end`` (a line crossing ``end`` is finished, a line
crossing ``start`` belongs to the partition before). Line numbers come from a cheap first pass that counts
newlines per range (at disk speed, far faster than scoring). In stream mode each file is one stream, so each
file is one partition: the state is carried across a whole file, as locally.

Each worker process maps a model directory once and keeps it for all its partitions (``_MODELS``); the
mapping is shared by the processes of a machine through the page cache. Workers must see the model
directory, the input files and the output folder at the same paths as the client (a shared filesystem);
a probe on every worker checks that before any work is sent. ``threads`` per process is chosen so task
slots x threads never exceeds a machine's cores.

A partition whose worker dies is recomputed elsewhere by Dask; its per-line output is written to a hidden
temporary file and renamed into place only when the partition is complete, so a lost attempt leaves no
partial file behind and every line is written exactly once.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import LstmInferError
from .scoring import MODES, LineScore, Scorer, ScoreResult
from .textio import Piece, open_input, read_pieces

PARTITION_BYTES = 8 << 20  # default partition size: tens of seconds of scoring per task on one core
FORMATS = ("jsonl", "parquet")
_SKIP_READ = 1 << 20  # bytes per read while skipping a partial first line
_COUNT_READ = 16 << 20  # bytes per read while counting newlines
PARQUET_ROWS = 8192  # lines per Parquet row group: bounds a worker's memory with per-token lists

# Test-only: (marker file, partition index). The first attempt at that partition kills its worker process
# mid-partition (os._exit) and leaves the marker, so the retry runs through. Never set outside tests.
_CRASH_ONCE: tuple[str, int] | None = None


@dataclass(frozen=True)
class Partition:
    """One task's input: the lines of ``path`` that start in ``[start, end)`` (end None: to the end of file)."""

    index: int  # position in the whole job, in input order; names the output file
    source: str  # the name results carry: the path as the caller gave it
    path: str  # absolute path, as workers open it
    start: int
    end: int | None


@dataclass(frozen=True)
class _Job:
    """What every partition task needs besides its partition."""

    model: str | None
    threads: dict[str, int]  # per host: threads for each task slot there
    mode: str
    batch_size: int
    per_token: bool
    errors: str
    keep_lines: bool
    output: str | None
    output_format: str
    width: int  # digits in output file names
    crash_once: tuple[str, int] | None = None


@dataclass
class _PartResult:
    index: int
    result: ScoreResult  # with .lines when the job keeps lines
    output: str | None
    error: str | None = None  # the user's error (bad input), returned rather than raised: no worker log noise


@dataclass
class FileScores:
    """``total`` over every file; ``files`` one (source, ScoreResult) per input file, in input order;
    ``outputs`` the per-line files written (one per partition, in input order; empty without ``output``)."""

    total: ScoreResult
    files: list[tuple[str, ScoreResult]]
    outputs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- inputs

def expand_inputs(paths_or_glob: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[str, str, int]]:
    """(source name, absolute path, size in bytes) per input file, in order. A string with * ? [ is a glob."""
    items = [paths_or_glob] if isinstance(paths_or_glob, (str, os.PathLike)) else list(paths_or_glob)
    out = []
    for item in items:
        item = os.fspath(item)
        if item == "-":
            raise LstmInferError("scoring on a cluster reads files, not standard input")
        names = [item]
        if glob.has_magic(item):
            names = sorted(glob.glob(item))
            if not names:
                raise LstmInferError(f"{item}: matches no files")
        for name in names:
            f, _, size = open_input(name)  # the file's own error (missing, a directory, unreadable)
            f.close()
            out.append((name, os.path.abspath(name), size or 0))
    if not out:
        raise LstmInferError("no input files given")
    return out


def plan(inputs: list[tuple[str, str, int]], mode: str, partition_size: int) -> list[Partition]:
    """Partitions in input order: byte ranges of ``partition_size`` (sentences), whole files (stream)."""
    parts = []
    for source, path, size in inputs:
        starts = range(0, size, partition_size) if mode == "sentences" and size else [0]
        for k, s in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else None
            parts.append(Partition(len(parts), source, path, s, end))
    return parts


# ---------------------------------------------------------------------------------------------- on workers

_MODELS: dict[tuple[str | None, int], object] = {}
_MODELS_LOCK = threading.Lock()


def _model(path: str | None, threads: int):
    """This process's Model for (path, threads): mapped on first use, reused by every later partition."""
    from .model import load

    with _MODELS_LOCK:
        key = (path, threads)
        if key not in _MODELS:
            _MODELS[key] = load(path, threads=threads)
        return _MODELS[key]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _probe(model: str | None, paths: list[str], output: str | None, parquet: bool, dask_worker=None) -> dict:
    """Run on every worker before any work: can it load the model, read the inputs, write the output?"""
    from distributed.comm import get_address_host

    problems = []
    try:
        _model(model, 1)
    except LstmInferError as err:
        problems.append(f"cannot load the model ({err})")
    missing = [p for p in paths if not os.access(p, os.R_OK)]
    if missing:
        problems.append(f"cannot read {len(missing)} input file(s), e.g. {missing[0]}")
    if output is not None and not (os.path.isdir(output) and os.access(output, os.W_OK)):
        problems.append(f"cannot write to the output folder {output}")
    if parquet and importlib.util.find_spec("pyarrow") is None:
        problems.append("has no pyarrow for Parquet output")
    return {"host": get_address_host(dask_worker.address), "cores": _cores(), "slots": dask_worker.state.nthreads,
            "problems": problems}


def _count_newlines(path: str, start: int, end: int) -> int:
    """Newline bytes in ``[start, end)`` of a file."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            buf = f.read(min(left, _COUNT_READ))
            if not buf:
                break
            n += buf.count(b"\n")
            left -= len(buf)
    return n


class _LineRange:
    """A binary stream's ``readline`` that ends before the first line starting at or after ``end``."""

    def __init__(self, f, pos: int, end: int | None):
        self.f, self.pos, self.end, self.at_line_start = f, pos, end, True

    def readline(self, size: int = -1) -> bytes:
        if self.at_line_start and self.end is not None and self.pos >= self.end:
            return b""
        s = self.f.readline(size)
        self.pos += len(s)
        self.at_line_start = s.endswith(b"\n")
        return s


def _skip_partial_line(f, start: int) -> tuple[int, int]:
    """Move ``f`` to the first line start at or after ``start`` > 0: (its offset, newlines passed at/after start)."""
    f.seek(start - 1)
    pos, s = start - 1, b""
    while True:  # byte start-1 is read so a line starting exactly at start is kept
        s = f.readline(_SKIP_READ)
        pos += len(s)
        if not s or s.endswith(b"\n"):
            break
    return pos, int(s.endswith(b"\n") and pos > start)


def read_partition(part: Partition, first_line: int, f, *, errors: str = "strict",
                   word_cut: bool = False) -> Iterator[Piece]:
    """Pieces of the lines a partition owns, numbered in the whole file.

    ``f`` is the open binary file; ``first_line`` is 1 + the newlines before ``part.start``.
    """
    pos, line = 0, first_line
    if part.start > 0:
        pos, passed = _skip_partial_line(f, part.start)
        line += passed
    return read_pieces(_LineRange(f, pos, part.end), part.source, errors=errors, word_cut=word_cut, first_line=line)


class _Output:
    """Per-line results of one partition, written to a hidden temporary file and renamed in when complete.

    JSON Lines: one ``LineScore.as_dict()`` per line. Parquet: the same fields as columns, a row group per
    PARQUET_ROWS lines, one fixed schema (so an empty partition's file reads like the others).
    """

    def __init__(self, job: _Job, part: Partition):
        name = f"part-{part.index:0{job.width}d}.{job.output_format}"
        self.path = os.path.join(job.output, name)
        self.tmp = os.path.join(job.output, f".{name}.{os.getpid()}.tmp")
        self.rows: list[dict] = []
        if job.output_format == "parquet":
            import pyarrow.parquet as pq

            self.schema = _parquet_schema(job.per_token)
            self.f = pq.ParquetWriter(self.tmp, self.schema)
        else:
            self.schema, self.f = None, open(self.tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed in commit

    def write(self, ls: LineScore) -> None:
        if self.schema is None:
            self.f.write(json.dumps(ls.as_dict(), ensure_ascii=False) + "\n")
            return
        self.rows.append(ls.as_dict())
        if len(self.rows) >= PARQUET_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        self.f.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows = []

    def commit(self) -> str:
        if self.schema is not None and self.rows:
            self._flush()  # with no rows at all the file still holds the schema
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)


def _parquet_schema(per_token: bool):
    import pyarrow as pa

    cols = [("source", pa.string()), ("line", pa.int64()), ("log_prob", pa.float64()), ("tokens", pa.int64()),
            ("oov", pa.int64())]
    if per_token:
        tok = pa.struct([("token", pa.string()), ("log_prob", pa.float64()), ("oov", pa.bool_())])
        cols.append(("token_log_probs", pa.list_(tok)))
    return pa.schema(cols)


def _score_partition(part: Partition, first_line: int, job: _Job) -> _PartResult:
    """The worker task: score one partition, write its per-line file, return its totals (and lines)."""
    from distributed import get_worker
    from distributed.comm import get_address_host

    threads = job.threads.get(get_address_host(get_worker().address), 1)
    result = ScoreResult(lines=[] if job.keep_lines else None)
    crash = job.crash_once is not None and job.crash_once[1] == part.index and not os.path.exists(job.crash_once[0])
    out = None
    try:
        scorer = Scorer(_model(job.model, threads), job.mode, job.batch_size, job.per_token)
        out = _Output(job, part) if job.output is not None else None
        f, _, _ = open_input(part.path)  # raises LstmInferError naming the file
        with f:
            pieces = read_partition(part, first_line, f, errors=job.errors, word_cut=scorer.word_cut)
            for ls in scorer.score(pieces, part.source):
                result.add(ls)
                if out is not None:
                    out.write(ls)
                if crash:  # test-only: die mid-partition, as a worker lost to the OOM killer would
                    open(job.crash_once[0], "w").close()
                    os._exit(1)
        return _PartResult(part.index, result, out.commit() if out is not None else None)
    except (LstmInferError, OSError) as err:
        if out is not None:
            out.abort()
        if isinstance(err, OSError):
            err = LstmInferError(f"{err.filename or part.source}: {err.strerror or err}")
        return _PartResult(part.index, result, None, str(err))
    except BaseException:
        if out is not None:
            out.abort()
        raise


# ---------------------------------------------------------------------------------------------- on the client

def local_cluster(n_workers: int):
    """A LocalCluster of ``n_workers`` single-slot processes on the loopback, without a dashboard."""
    import distributed

    # The scheduler's plain HTTP routes (health, metrics) still listen: on a free loopback port, not 8787.
    return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})


@contextlib.contextmanager
def connect(client=None, threads: int | None = None):
    """A dask Client for ``client``: a Client (used as is), a scheduler address ``tcp://host:port``, ``"local"``
    (a LocalCluster of cores // threads processes on the loopback, closed afterwards) or None (the current
    default client if there is one, else as ``"local"``)."""
    try:
        import distributed
    except ImportError:
        raise LstmInferError("scoring on a cluster needs Dask: pip install 'lstm-infer[dask]'") from None
    if client is None:
        with contextlib.suppress(ValueError):
            client = distributed.default_client()
    if client is not None and not isinstance(client, str):
        yield client
    elif client in (None, "local"):
        with local_cluster(max(1, _cores() // (threads or 1))) as cluster, distributed.Client(cluster) as c:
            yield c
    else:
        try:
            c = distributed.Client(client, timeout=10)
        except (OSError, TimeoutError, ValueError) as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LstmInferError(f"{client}: cannot reach the Dask scheduler ({msg})") from None
        with c:
            yield c


def _check_workers(client, model: str | None, parts: list[Partition], output: str | None, parquet: bool,
                   threads: int | None) -> dict[str, int]:
    """Probe every worker; threads per task slot for each host. Raises naming the workers that cannot work."""
    try:
        client.wait_for_workers(1, timeout=60)
    except TimeoutError:
        raise LstmInferError(f"{client.scheduler.address}: no Dask workers joined within 60 s") from None
    paths = sorted({p.path for p in parts})
    try:
        report = client.run(_probe, model, paths, output, parquet)
    except Exception as err:  # noqa: BLE001 - e.g. workers without lstm_infer cannot unpickle the probe
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LstmInferError(f"Dask workers cannot run lstm-infer ({type(err).__name__}: {msg}); install "
                             "lstm-infer[dask] on every worker") from None
    bad = {addr: r["problems"] for addr, r in report.items() if r["problems"]}
    if bad:
        addr, problems = next(iter(bad.items()))
        raise LstmInferError(f"{len(bad)} of {len(report)} Dask workers cannot score, e.g. {addr}: "
                             f"{'; '.join(problems)}. The model, the inputs and the output folder must be at the "
                             "same paths on every worker (a shared filesystem)")
    per_host: dict[str, int] = {}
    cores: dict[str, int] = {}
    for r in report.values():
        per_host[r["host"]] = per_host.get(r["host"], 0) + r["slots"]
        cores[r["host"]] = r["cores"]
    return {h: min(threads or cores[h], max(1, cores[h] // slots)) for h, slots in per_host.items()}


def _first_lines(client, parts: list[Partition]) -> list[int]:
    """1 + newlines before each partition's start: counted per range on the workers, summed here."""
    ranges = [(p.path, p.start, q.start) for p, q in zip(parts, parts[1:]) if q.path == p.path and q.start > 0]
    counts = iter(client.gather(client.map(_count_newlines, *zip(*ranges), pure=False)) if ranges else [])
    first, out = 1, []
    for p in parts:
        first = 1 if p.start == 0 else first + next(counts)
        out.append(first)
    return out


def _run_partitions(client, inputs: list[tuple[str, str, int]], *, model: str | None = None,
                    mode: str = "sentences", partition_size: int = PARTITION_BYTES, threads: int | None = None,
                    batch_size: int = 64, per_token: bool = False, encoding_errors: str = "strict",
                    keep_lines: bool = False, output: str | None = None,
                    output_format: str = "jsonl") -> Iterator[tuple[Partition, _PartResult]]:
    """Score ``inputs`` (from expand_inputs) on ``client``; (partition, result) pairs in input order."""
    if mode not in MODES:
        raise LstmInferError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(partition_size, int) or partition_size < 1:
        raise LstmInferError(f"partition size must be a positive number of bytes, got {partition_size!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise LstmInferError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LstmInferError(f"batch size must be a positive integer, got {batch_size!r}")
    if encoding_errors not in ("strict", "replace"):
        raise LstmInferError(f"encoding errors must be 'strict' or 'replace', got {encoding_errors!r}")
    from distributed.scheduler import KilledWorker

    model = None if model is None else os.path.abspath(os.fspath(model))
    parts = plan(inputs, mode, partition_size)
    job = _Job(model, _check_workers(client, model, parts, output, output_format == "parquet", threads), mode,
               batch_size, per_token, encoding_errors, keep_lines, output, output_format,
               max(5, len(str(len(parts) - 1))), _CRASH_ONCE)
    first = _first_lines(client, parts)
    futures = [client.submit(_score_partition, p, n, job, pure=False, priority=-p.index)
               for p, n in zip(parts, first)]
    try:
        for k, p in enumerate(parts):
            fut, futures[k] = futures[k], None  # dropped once read, so workers can free the result
            try:
                res = fut.result()
            except KilledWorker:
                raise LstmInferError(f"{p.source}: bytes {p.start}-{'' if p.end is None else p.end} killed several "
                                     "Dask workers in a row (out of memory?); giving up") from None
            if res.error is not None:
                raise LstmInferError(res.error)
            yield p, res
    finally:
        client.cancel([f for f in futures if f is not None])


def _merge(into: ScoreResult, part: ScoreResult) -> None:
    into.tokens += part.tokens
    into.oov += part.oov
    into.log_prob += part.log_prob
    into.oov_log_prob += part.oov_log_prob
    into.words += part.words
    into.line_count += part.line_count


def score_files(paths_or_glob, model: str | os.PathLike | None = None, client=None, mode: str = "sentences",
                partition_size: int = PARTITION_BYTES, threads: int | None = None, output: str | None = None,
                output_format: str = "jsonl", batch_size: int = 64, encoding_errors: str = "strict",
                per_token: bool = False) -> FileScores:
    """Score files on a Dask cluster: totals and per-file results as a local ``lstm-infer score`` gives them.

    ``paths_or_glob``: a path, a glob (``"corpus/*.txt"``) or a list of them. ``model``: a model directory
    (None: the bundled one). ``client``: a dask Client, a scheduler address, ``"local"`` or None (see
    ``connect``). ``threads``: engine threads per task, at most cores / task slots of each machine (default:
    exactly that). ``output``: a folder for per-line results, one ``part-NNNNN.jsonl`` / ``.parquet`` per
    partition, read in name order for input order (needs pyarrow for Parquet).
    """
    if output_format not in FORMATS:
        raise LstmInferError(f"output format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if output is not None and output_format == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise LstmInferError("Parquet output needs pyarrow: pip install pyarrow (or use output_format='jsonl')")
    inputs = expand_inputs(paths_or_glob)
    if output is not None:
        output = _prepare_output(os.fspath(output))
    result = FileScores(ScoreResult(), [])
    try:
        with connect(client, threads) as c:
            for p, res in _run_partitions(c, inputs, model=model, mode=mode, partition_size=partition_size,
                                          threads=threads, batch_size=batch_size, per_token=per_token,
                                          encoding_errors=encoding_errors, output=output,
                                          output_format=output_format):
                if p.start == 0:
                    result.files.append((p.source, ScoreResult()))
                _merge(result.files[-1][1], res.result)
                _merge(result.total, res.result)
                if res.output is not None:
                    result.outputs.append(res.output)
    finally:
        if output is not None:
            for tmp in glob.glob(os.path.join(output, ".part-*.tmp")):  # left by attempts whose worker died
                with contextlib.suppress(OSError):
                    os.remove(tmp)
    return result


def _prepare_output(folder: str) -> str:
    """The output folder, created; refused when it already holds results (they would mix with these)."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise LstmInferError(f"{folder}: output exists and is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise LstmInferError(f"{folder}: cannot create the output folder ({err.strerror})") from None
    if glob.glob(os.path.join(folder, "part-*")):
        raise LstmInferError(f"{folder}: already holds part-* results; choose a new or empty folder")
    return folder


def score_for_cli(files: tuple[str, ...], model: str | None, scheduler: str, total: ScoreResult, *, mode: str,
                  batch_size: int, threads: int | None, per_line: bool, per_token: bool,
                  encoding_errors: str) -> Iterator[LineScore]:
    """``lstm-infer score --scheduler``: adds everything into ``total``; yields the lines (in order) when
    ``per_line``, so the command writes exactly what a local run writes."""
    inputs = expand_inputs(files or ("-",))
    with connect(scheduler, threads) as c:
        workers = len(c.scheduler_info(n_workers=-1)["workers"])
        sys.stderr.write(f"lstm-infer: scoring {len(inputs)} file(s) on {workers} Dask worker(s) at "
                         f"{c.scheduler.address}\n")
        for _, res in _run_partitions(c, inputs, model=model, mode=mode, threads=threads, batch_size=batch_size,
                                      per_token=per_token, encoding_errors=encoding_errors, keep_lines=per_line):
            if per_line:
                for ls in res.result.lines:
                    total.add(ls)
                    yield ls
            else:
                _merge(total, res.result)
