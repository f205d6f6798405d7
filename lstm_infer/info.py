"""What ``lstm-infer info`` shows: architecture, parameter count, vocabulary, format, provenance."""

from __future__ import annotations

import json

from .format import FORMAT_VERSION


def _nonlinearity(layer: dict) -> str:
    acts = layer["activations"][0]
    if layer["cell"] == "rnn":
        return acts[0]["name"]
    return "/".join(a["name"] for a in acts)


def summary(model) -> dict:
    """A JSON-ready description of a loaded Model."""
    cfg = model.config
    params = sum(int(t.size) for t in _tensors(model))
    layers = []
    for li, ly in enumerate(cfg["layers"]):
        d = {k: ly[k] for k in ("cell", "input_size", "hidden_size", "proj_size", "direction")}
        d["activations"] = _nonlinearity(ly)
        d.update({k: ly[k] for k in ("peepholes", "clip", "input_forget", "linear_before_reset") if ly[k]})
        d["index"] = li
        layers.append(d)
    tok = cfg["tokenizer"]
    vocab = None
    if model.vocab is not None:
        show = [model.tokenizer.token_text(i) for i in range(min(12, len(model.vocab)))] if model.tokenizer else []
        vocab = {"size": len(model.vocab), "first": show}
    return {"path": str(model.path) if model.path else None, "format_version": cfg["format_version"],
            "parameters": params, "embedding": cfg["embedding"], "layers": layers, "head": cfg["head"],
            "tokenizer": tok, "vocab": vocab, "provenance": cfg["provenance"]}


def _tensors(model):
    """Every stored tensor once (a tied head is the embedding)."""
    for ly, lc in zip(model.layers, model.config["layers"]):
        for d in ly.dirs:
            yield from (t for t in (d.w_ih, d.w_hh, d.bias, d.b_hn, d.w_hr) if t is not None)
            if lc["peepholes"]:
                yield d.peep
    yield from (t for t in (model.embedding, model.head_b) if t is not None)
    if model.head_w is not None and model.head_w is not model.embedding:
        yield model.head_w


def describe(model) -> str:
    """Human-readable lines for ``lstm-infer info``."""
    s = summary(model)
    out = [f"model:       {s['path']}", f"format:      lstm-infer v{s['format_version']} (this engine reads "
           f"v{FORMAT_VERSION})", f"parameters:  {s['parameters']:,} ({4 * s['parameters'] / 1e6:.1f} MB float32)"]
    if s["embedding"]:
        out.append(f"embedding:   {s['embedding']['vocab_size']:,} x {s['embedding']['dim']}")
    for ly in s["layers"]:
        extra = [f"proj {ly['proj_size']}"] if ly["proj_size"] else []
        extra += [k.replace("_", " ") if ly[k] is True else f"{k} {ly[k]}"
                  for k in ("peepholes", "clip", "input_forget", "linear_before_reset") if k in ly]
        out.append(f"layer {ly['index']}:     {ly['cell']} {ly['input_size']} -> {ly['hidden_size']}, "
                   f"{ly['direction']}, {ly['activations']}" + "".join(f", {e}" for e in extra))
    if s["head"]:
        h = s["head"]
        out.append(f"head:        {h['input_size']} -> {h['output_size']}"
                   f"{', tied to the embedding' if h['tied'] else ''}{', bias' if h['bias'] else ''}")
    tok = s["tokenizer"]
    if tok:
        specials = ", ".join(f"{k} {tok[k]!r}" for k in ("bos", "eos", "unk") if tok.get(k) is not None)
        out.append(f"tokenizer:   {tok['kind']}" + (f" ({specials})" if specials else ""))
    if s["vocab"]:
        out.append(f"vocabulary:  {s['vocab']['size']:,} tokens: {' '.join(s['vocab']['first'])} ...")
    for k, v in s["provenance"].items():
        out.append(f"provenance.{k}: {v if isinstance(v, str) else json.dumps(v)}")
    return "\n".join(out)
