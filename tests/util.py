"""Test helpers: deterministic random PyTorch modules and their engine twins."""

from __future__ import annotations

import numpy as np

from converters import layout
from lstm_infer import format as fmt
from lstm_infer.model import Model, load


def scramble(module, seed: int, scale: float = 0.6) -> None:
    """Re-draw every parameter from U(-scale, scale): gates differ enough that a wrong order shows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * scale)


def torch_stack_tensors(rnn, cell: str) -> tuple[list[dict], dict]:
    """Layer configs and engine tensors for a torch.nn.LSTM / GRU / RNN."""
    sd = {k: v.detach().numpy() for k, v in rnn.state_dict().items()}
    direction = "bidirectional" if rnn.bidirectional else "forward"
    proj = getattr(rnn, "proj_size", 0)
    nonlin = getattr(rnn, "nonlinearity", "tanh")
    layers, tensors = [], {}
    in_size = rnn.input_size
    for k in range(rnn.num_layers):
        per_dir = []
        for sfx in ("", "_reverse")[: 2 if rnn.bidirectional else 1]:
            per_dir.append(layout.from_torch(
                cell, sd[f"weight_ih_l{k}{sfx}"], sd[f"weight_hh_l{k}{sfx}"],
                sd.get(f"bias_ih_l{k}{sfx}"), sd.get(f"bias_hh_l{k}{sfx}"), sd.get(f"weight_hr_l{k}{sfx}")))
        tensors.update(layout.layer_tensors(k, direction, per_dir))
        lc = fmt.layer_config(cell, in_size, rnn.hidden_size, proj_size=proj, direction=direction,
                              nonlinearity=nonlin, linear_before_reset=cell == "gru")
        layers.append(lc)
        in_size = fmt.layer_output_size(lc)
    return layers, tensors


def engine_from_torch(rnn, cell: str, tmp_path, embedding=None, head=None, vocab=None,
                      tokenizer=None, threads=None) -> Model:
    """Write a model directory for a torch recurrent module (+ optional embedding / Linear head), load it."""
    layers, tensors = torch_stack_tensors(rnn, cell)
    emb_cfg = head_cfg = None
    if embedding is not None:
        w = embedding.weight.detach().numpy()
        tensors["embedding"] = w
        emb_cfg = {"vocab_size": w.shape[0], "dim": w.shape[1]}
    if head is not None:
        tensors["head.weight"] = head.weight.detach().numpy()
        if head.bias is not None:
            tensors["head.bias"] = head.bias.detach().numpy()
        head_cfg = {"output_size": head.out_features, "input_size": head.in_features, "tied": False,
                    "bias": head.bias is not None}
    cfg = fmt.make_config(layers, embedding=emb_cfg, head=head_cfg, tokenizer=tokenizer)
    out = fmt.write_model(tmp_path / "model", cfg, tensors, vocab)
    return load(out, threads=threads)


def np_state(t):
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(np_state(x) for x in t)
    return t.detach().numpy()


def assert_close(a, b, atol=2e-5, rtol=1e-4):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=rtol)
