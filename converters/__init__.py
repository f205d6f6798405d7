"""Converters: PyTorch and ONNX checkpoints -> lstm-infer model directories.

``convert()`` = detect the source kind -> load it into a spec ``(config, tensors, vocab)`` (pytorch.py or
onnx.py) -> apply the vocabulary / tokenizer options (vocab.py) -> ``format.write_model`` (validated, atomic).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

from lstm_infer import __version__
from lstm_infer import format as fmt
from lstm_infer.errors import LstmInferError

from .vocab import read_vocab_file, resolve_tokenizer

KINDS = ("torch-zip", "torch-legacy-pickle", "torchscript", "safetensors", "onnx")


def detect_kind(path: str | os.PathLike) -> str:
    """The checkpoint kind, from the file's content (the suffix only breaks the tie for ONNX protobufs).

    Returns one of "torch-zip", "torch-legacy-pickle", "torchscript", "safetensors", "onnx".
    """
    p = Path(path)
    if not p.exists():
        raise LstmInferError(f"{p}: file not found")
    if not p.is_file():
        raise LstmInferError(f"{p}: is not a file")
    with open(p, "rb") as f:
        head = f.read(16)
    if not head:
        raise LstmInferError(f"{p}: the file is empty")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError):
            raise LstmInferError(f"{p}: a zip archive (PyTorch checkpoint) that is truncated or corrupt") from None
        # torch.jit.save writes TorchScript code under code/ and a constants.pkl; torch.save writes neither.
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        raise LstmInferError(f"{p}: a zip archive, but neither a torch.save checkpoint nor a TorchScript archive")
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-legacy-pickle"  # torch.save(..., _use_new_zipfile_serialization=False)
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"  # 8-byte little-endian header length, then a JSON header
    if head[0] == 0x08 or p.suffix.lower() == ".onnx":
        return "onnx"  # protobuf ModelProto, whose first field is ir_version (tag 0x08)
    raise LstmInferError(f"{p}: not a recognised checkpoint (expected a PyTorch state_dict .pt/.pth/.bin, a "
                         "TorchScript archive, a .safetensors or an .onnx file)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load(src: Path, kind: str, *, nonlinearity: str, embedding: str | None, rnn: str | None,
          head: str | None) -> tuple[dict, dict, list[str] | None]:
    if kind == "onnx":
        given = [flag for flag, v in (("--embedding", embedding), ("--rnn", rnn), ("--head", head)) if v is not None]
        if nonlinearity != "tanh":
            given.append("--nonlinearity")
        if given:
            raise LstmInferError(f"{src}: {', '.join(given)} apply to PyTorch checkpoints only (an ONNX graph "
                                 "states its structure)")
        try:
            from .onnx import load_onnx
        except ImportError as err:
            raise LstmInferError(f"{src}: ONNX conversion is not available in this installation ({err})") from None
        return load_onnx(src)
    try:
        from .pytorch import load_torch
    except ImportError as err:  # pragma: no cover - numpy-only installs
        raise LstmInferError(f"{src}: the PyTorch converter cannot be imported ({err})") from None
    needs_torch = kind != "safetensors"
    if needs_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise LstmInferError(f"{src}: reading a {kind} checkpoint needs PyTorch "
                                 "(pip install 'lstm-infer[torch]'); .safetensors files do not") from None
    return load_torch(src, kind, nonlinearity=nonlinearity, embedding=embedding, rnn=rnn, head=head)


def convert(src: str | os.PathLike, out: str | os.PathLike, *, vocab: str | os.PathLike | list[str] | None = None,
            tokenizer: str | None = None, unk: str | None = None, eos: str | None = None, bos: str | None = None,
            nonlinearity: str = "tanh", embedding: str | None = None, rnn: str | None = None,
            head: str | None = None, force: bool = False, provenance: dict | None = None) -> Path:
    """Convert a checkpoint into a model directory at ``out`` and return its path.

    ``vocab``: a vocabulary file (text, one token per line; or JSON) or a list of tokens; default: one found
    in the checkpoint. ``tokenizer``: "word" | "char" | "byte" | None (see vocab.resolve_tokenizer).
    ``embedding`` / ``rnn`` / ``head``: state_dict names that settle the roles when the structure is ambiguous.
    ``nonlinearity``: "tanh" | "relu" for nn.RNN, which a state_dict does not record.
    ``provenance``: extra entries for config.json's provenance (training details, say).
    """
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise LstmInferError(f"{out}: already exists (use --force to replace it)")
    kind = detect_kind(src)
    config, tensors, found = _load(src, kind, nonlinearity=nonlinearity, embedding=embedding, rnn=rnn, head=head)
    if vocab is None:
        tokens, where = found, str(src)
    elif isinstance(vocab, (list, tuple)):
        tokens, where = list(vocab), "vocab"
    else:
        tokens, where = read_vocab_file(vocab), str(vocab)
    emb = config["embedding"]
    tok, tokens = resolve_tokenizer(tokens, emb["vocab_size"] if emb else None, kind=tokenizer, bos=bos, eos=eos,
                                    unk=unk, where=where)
    config["tokenizer"] = tok
    config["provenance"] = {**(config.get("provenance") or {}), "source": src.name, "sha256": _sha256(src),
                            "source_kind": kind, "converter": f"lstm-infer {__version__}", **(provenance or {})}
    if tok is not None:
        fmt.validate_vocab(tokens, config, where)
    return fmt.write_model(out, config, tensors, tokens, force=force)
