"""The ``lstm-infer`` command line: score, convert, info, generate.

Every failure the user can cause ends as one line on stderr and a non-zero exit; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from typing import Any

import click

from .errors import LstmInferError

EXIT_ERROR = 1


class _Group(click.Group):
    """Turns every error into one line on stderr (or a traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            sys.stderr.close()  # a closed pipe (| head) is the reader's choice, not an error
            sys.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as err:  # noqa: BLE001 - the one place that turns errors into messages
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            elif isinstance(err, LstmInferError):
                click.echo(f"lstm-infer: error: {err}", err=True)
            elif isinstance(err, MemoryError):
                click.echo("lstm-infer: error: out of memory", err=True)
            elif isinstance(err, OSError):
                where = f"{err.filename}: " if getattr(err, "filename", None) else ""
                click.echo(f"lstm-infer: error: {where}{err.strerror or err}", err=True)
            else:
                msg = str(err).splitlines()[0] if str(err) else ""
                click.echo(f"lstm-infer: internal error: {type(err).__name__}: {msg} "
                           "(run with --debug for the traceback and please report it)", err=True)
            sys.exit(EXIT_ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
@click.version_option(package_name="lstm-infer")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Fast CPU inference for LSTM / GRU / RNN language models."""
    ctx.obj = {"debug": debug}


def load_model(path: str | None, threads: int | None, jit: bool = True):
    """The model at ``path`` (None: the bundled one), with ``threads`` threads (see model.load for ``jit``)."""
    from .model import load

    return load(path, threads=threads, jit=jit)


# `score` runs inputs up to this size in NumPy (eager.py): a one-line score of the 1500-unit model took
# 1.10-1.29 s with Numba's start-up, 0.54-0.76 s without. NumPy's batch-1 step of that model is slower than
# the kernels' (~1.3 vs ~0.8 ms a layer): by these figures Numba's start-up pays from roughly 500 words on
# that model, and much later on small ones; 2 KB is ~400 words of English.
EAGER_BYTES = 2048

MODEL_OPTION = click.option("-m", "--model", "model_path", type=click.Path(), default=None,
                            help="Model directory (default: the bundled byte-level English model).")
THREADS_OPTION = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="Threads for the engine (default: all cores).")


# ---------------------------------------------------------------------------------------------- score

def _small_files(files: tuple[str, ...]) -> bool:
    """Whether FILES are regular files of at most EAGER_BYTES together (standard input: size unknown)."""
    try:
        return bool(files) and all(f != "-" and os.path.isfile(f) for f in files) and \
            sum(os.path.getsize(f) for f in files) <= EAGER_BYTES
    except OSError:
        return False


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


@main.command()
@click.argument("files", nargs=-1, type=click.Path(allow_dash=True))
@MODEL_OPTION
@click.option("--mode", type=click.Choice(["sentences", "stream"]), default="sentences", show_default=True,
              help="sentences: every line from a fresh state; stream: one text, state carried across lines.")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "tsv"]), default="text", show_default=True)
@click.option("--per-line", is_flag=True, help="Report every line.")
@click.option("--per-token", is_flag=True, help="Report every token (implies --per-line).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Lines scored together (sentences mode).")
@THREADS_OPTION
@click.option("--progress/--no-progress", default=None, help="Progress on stderr (default: when it is a terminal).")
@click.option("--encoding-errors", type=click.Choice(["strict", "replace"]), default="strict", show_default=True,
              help="Non-UTF-8 input: stop with an error, or score it with U+FFFD in place of bad bytes.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Score on a Dask cluster: its scheduler (tcp://host:8786), or 'local' for worker processes here.")
@click.option("--jit/--no-jit", default=None,
              help=f"Numba kernels, or plain NumPy steps (standard LSTM models; others always take the kernels; "
                   f"ignored with --scheduler). Default: NumPy when the FILES come to at most {EAGER_BYTES // 1024} "
                   f"KB, where Numba's ~0.5 s start-up would outweigh the work.")
def score(files: tuple[str, ...], model_path: str | None, mode: str, fmt: str, per_line: bool, per_token: bool,
          batch_size: int, threads: int | None, progress: bool | None, encoding_errors: str,
          scheduler: str | None, jit: bool | None) -> None:
    """Perplexity of text FILES (none or '-': standard input). Log-probs are natural logs."""
    from .scoring import Scorer, ScoreResult
    from .textio import Progress, open_input, read_pieces

    per_line = per_line or per_token
    model = load_model(model_path, threads, not _small_files(files) if jit is None else jit)
    scorer = Scorer(model, mode, batch_size, per_token)
    total = ScoreResult()
    out = sys.stdout
    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    if fmt == "json":
        out.write('{"lines": [' if per_line else "{")
    elif fmt == "tsv":
        cols = ["source", "line", "position", "token", "log_prob", "oov"] if per_token else \
            ["source", "line", "tokens", "oov", "log_prob", "perplexity"]
        out.write("\t".join(cols) + "\n")
    first = True
    if scheduler is not None:  # distributed.py does the work; lines come back in input order
        from .distributed import score_for_cli

        for ls in score_for_cli(files, model_path, scheduler, total, mode=mode, batch_size=batch_size,
                                threads=threads, per_line=per_line, per_token=per_token,
                                encoding_errors=encoding_errors):
            _write_line(out, fmt, ls, per_token, first)
            first = False
    for path in (files or ("-",)) if scheduler is None else ():
        f, name, size = open_input(path)
        bar = Progress(size, show)
        try:
            for ls in scorer.score(read_pieces(f, name, errors=encoding_errors, word_cut=scorer.word_cut,
                                               progress=bar), name):
                total.add(ls)
                bar.tokens = total.tokens
                if per_line:
                    _write_line(out, fmt, ls, per_token, first)
                    first = False
        finally:
            bar.close()
            if f is not sys.stdin.buffer:
                f.close()
    secs = time.perf_counter() - t0
    _write_summary(out, fmt, total, per_line, model, mode)
    out.flush()
    rate = total.tokens / secs if secs > 0 else 0.0
    click.echo(f"lstm-infer: scored {total.tokens:,} tokens in {secs:.2f} s ({rate:,.0f} tokens/s, "
               f"{model.threads} thread{'s' if model.threads > 1 else ''})", err=True)


def _write_line(out, fmt: str, ls, per_token: bool, first: bool) -> None:
    from .scoring import _ppl
    if fmt == "json":
        out.write(("" if first else ",") + "\n " + json.dumps(ls.as_dict(), ensure_ascii=False))
    elif fmt == "tsv":
        if per_token:
            for k, (t, lp, o) in enumerate(zip(ls.token_texts or [], ls.token_log_probs or [], ls.token_oov or [])):
                tok = t.replace("\t", "\\t").replace("\n", "\\n")
                out.write(f"{ls.source}\t{ls.line}\t{k}\t{tok}\t{lp:.6f}\t{int(o)}\n")
        else:
            ppl = _ppl(ls.log_prob, ls.tokens)
            out.write(f"{ls.source}\t{ls.line}\t{ls.tokens}\t{ls.oov}\t{ls.log_prob:.6f}\t{_fmt(ppl)}\n")
    else:
        ppl = _ppl(ls.log_prob, ls.tokens)
        out.write(f"{ls.source}:{ls.line}\tlog_prob={ls.log_prob:.4f}\ttokens={ls.tokens}\toov={ls.oov}"
                  f"\tppl={_fmt(ppl)}\n")
        if per_token:
            for t, lp, o in zip(ls.token_texts or [], ls.token_log_probs or [], ls.token_oov or []):
                out.write(f"\t{t!r}\t{lp:.4f}{'  (oov)' if o else ''}\n")


def _write_summary(out, fmt: str, r, per_line: bool, model, mode: str) -> None:
    if fmt == "json":
        d = {k: (_num(v) if isinstance(v, float) or v is None else v) for k, v in r.as_dict().items()}
        body = json.dumps(d, ensure_ascii=False)[1:-1]
        out.write(("\n], " if per_line else "") + body + "}\n")
        return
    if fmt == "tsv":
        return
    kind = model.tokenizer.kind
    eos = "incl. one end-of-line token per line" if model.tokenizer.eos_id is not None else "no end-of-line token"
    lines = [
        f"Mode: {mode}   Lines: {r.line_count:,}   Tokens: {r.tokens:,} ({kind}s, {eos})   OOVs: {r.oov:,}",
        f"Log-prob (natural log): {r.log_prob:.4f}",
        f"Perplexity including OOVs: {_fmt(r.perplexity)}",
        f"Perplexity excluding OOVs: {_fmt(r.perplexity_excl_oov)}",
        f"Bits per {kind}: {_fmt(r.bits_per_token)}",
    ]
    if kind != "word":
        lines.append(f"Word perplexity ({r.words:,} words incl. end-of-line): {_fmt(r.word_perplexity, '.2f')}")
    out.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- info

@main.command()
@click.argument("model_dir", required=False, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def info(model_dir: str | None, fmt: str) -> None:
    """Architecture, parameters, vocabulary and provenance of MODEL_DIR (default: the bundled model)."""
    from .info import describe, summary

    model = load_model(model_dir, None)
    if fmt == "json":
        click.echo(json.dumps(summary(model), indent=1, ensure_ascii=False))
    else:
        click.echo(describe(model))


# ---------------------------------------------------------------------------------------------- convert

@main.command()
@click.argument("src", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Model directory to write.")
@click.option("--vocab", type=click.Path(), default=None,
              help="Vocabulary: text (one token per line) or JSON (token->id object or token list).")
@click.option("--tokenizer", type=click.Choice(["word", "char", "byte"]), default=None,
              help="How text becomes tokens (default: byte for 256-row embeddings without vocab, else word).")
@click.option("--unk", default=None, help="Unknown-word token (default: <unk> when the vocabulary has it).")
@click.option("--eos", default=None, help="End-of-sentence token (default: <eos> or </s> when present).")
@click.option("--bos", default=None, help="Start token (default: <s> or <bos> when present).")
@click.option("--nonlinearity", type=click.Choice(["tanh", "relu"]), default="tanh", show_default=True,
              help="nn.RNN's nonlinearity (a state_dict does not record it).")
@click.option("--embedding", default=None, help="State-dict key of the embedding, where it is ambiguous.")
@click.option("--rnn", default=None, help="State-dict prefix of the recurrent module(s), where it is ambiguous.")
@click.option("--head", default=None, help="State-dict prefix of the output layer, where it is ambiguous.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def convert(src: str, out: str, **options: Any) -> None:
    """Convert a PyTorch checkpoint (.pt/.pth/.bin, TorchScript, .safetensors) or ONNX graph to a model directory."""
    from .converters import convert as run_convert

    path = run_convert(src, out, **options)
    from .info import describe
    from .model import load

    click.echo(f"wrote {path}")
    click.echo(describe(load(path)))


# ---------------------------------------------------------------------------------------------- generate

@main.command()
@click.argument("prompt", required=False, default="")
@MODEL_OPTION
@click.option("--method", type=click.Choice(["greedy", "beam", "sample"]), default="greedy", show_default=True)
@click.option("--beam-size", type=int, default=5, show_default=True, help="Beams kept at every step.")
@click.option("--max-tokens", type=int, default=100, show_default=True, help="New tokens at most.")
@click.option("--min-tokens", type=int, default=0, show_default=True, help="New tokens before eos may end a text.")
@click.option("--num-hypotheses", type=int, default=1, show_default=True,
              help="The N best beams, or N independent samples.")
@click.option("--length-penalty", type=float, default=1.0, show_default=True,
              help="Hypotheses rank by log_prob / length**A (length counting the eos).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling: divide logits by T.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sampling: only the K likeliest tokens (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Sampling: only the likeliest tokens whose mass reaches P.")
@click.option("--seed", type=int, default=None, help="Sampling seed: the same seed gives the same text.")
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-sequence token.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@THREADS_OPTION
def generate(prompt: str, model_path: str | None, method: str, beam_size: int, max_tokens: int, min_tokens: int,
             num_hypotheses: int, length_penalty: float, temperature: float, top_k: int, top_p: float,
             seed: int | None, ignore_eos: bool, fmt: str, threads: int | None) -> None:
    """Continue PROMPT (default: from the model's start symbol) by greedy search, beam search or sampling.

    Text output prints the prompt and then greedy or sampled tokens as they come; beams and several
    hypotheses print best first with their scores. Log-probs are natural logs.
    """
    model = load_model(model_path, threads)
    opts = dict(method=method, max_new_tokens=max_tokens, min_new_tokens=min_tokens, beam_size=beam_size,
                num_hypotheses=num_hypotheses, length_penalty=length_penalty, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=seed, stop_at_eos=not ignore_eos)
    tok = model.tokenizer
    sep = " " if tok is not None and tok.kind == "word" and prompt.strip() else ""
    out = sys.stdout
    t0 = time.perf_counter()
    if fmt == "text" and method != "beam" and num_hypotheses == 1:
        pieces = model.generate_tokens(prompt, **opts)  # options are checked here, before anything prints
        out.write(prompt)
        for k, piece in enumerate(pieces):
            out.write((sep if k == 0 else "") + piece)
            out.flush()
        out.write("\n")
        click.echo(f"lstm-infer: generated in {time.perf_counter() - t0:.2f} s", err=True)
        return
    hyps = model.generate(prompt, **opts)
    secs = time.perf_counter() - t0
    if fmt == "json":
        out.write(json.dumps({"prompt": prompt, "method": method, "hypotheses": [
            {"text": h.text, "ids": h.ids, "log_prob": h.log_prob, "score": h.score, "ended": h.ended} for h in hyps]},
            ensure_ascii=False) + "\n")
    else:
        for k, h in enumerate(hyps, 1):
            end = "eos" if h.ended else "length limit"
            out.write(f"[{k}] score {h.score:.4f}  log_prob {h.log_prob:.4f}  {len(h.ids)} tokens ({end})\n")
            out.write(f"{prompt}{sep if h.text else ''}{h.text}\n")
    n = sum(len(h.ids) + h.ended for h in hyps)
    click.echo(f"lstm-infer: generated {n:,} tokens in {secs:.2f} s", err=True)
