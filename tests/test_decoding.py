"""Decoding (greedy, beam, sampling, streaming) against PyTorch, exhaustive search and the softmax."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lstm_infer import LstmInferError, decoding  # noqa: E402
from lstm_infer import decode_kernels as dk  # noqa: E402
from lstm_infer import format as fmt  # noqa: E402
from lstm_infer.model import load  # noqa: E402
from tests import naive  # noqa: E402
from tests.test_engine_torch import lm_modules  # noqa: E402
from tests.util import assert_close, engine_from_torch, scramble, torch_stack_tensors  # noqa: E402

EOS = 0
CHAR_TOK = {"kind": "char", "bos": None, "eos": "\n", "unk": None}
CELLS = {  # id: (cell, torch kwargs)
    "lstm": ("lstm", dict(num_layers=2)),
    "lstmp": ("lstm", dict(num_layers=2, proj_size=3)),
    "gru": ("gru", dict(num_layers=2)),
    "rnn-tanh": ("rnn", dict(num_layers=2)),
    "rnn-relu": ("rnn", dict(num_layers=1, nonlinearity="relu")),
}
# Chi-square critical values at p = 0.001 for 1..11 degrees of freedom (scipy may be absent).
CHI2_999 = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26]


def vocab_of(V):
    return ["\n"] + [chr(ord("a") + i) for i in range(V - 1)]


def lm(tmp_path, key="lstm", V=12, seed=1, eos_bias=0.0, tokenizer=CHAR_TOK, vocab=None, threads=None):
    """A tiny char-level LM (engine model, torch modules); eos_bias makes "\\n" likelier."""
    cell, kw = CELLS[key]
    emb, rnn, head = lm_modules(cell, seed, V=V, E=6, H=8, **kw)
    with torch.no_grad():
        head.bias[EOS] += eos_bias
    model = engine_from_torch(rnn, cell, tmp_path, embedding=emb, head=head, vocab=vocab or vocab_of(V),
                              tokenizer=tokenizer, threads=threads)
    return model, (emb, rnn, head)


def gru_lbr0(tmp_path, V=12, eos_bias=1.0):
    """A GRU stack in the linear_before_reset=0 form (ONNX's default): torch's weights, biases folded."""
    emb, rnn, head = lm_modules("gru", 3, V=V, E=6, H=8, num_layers=2)
    layers, tensors = torch_stack_tensors(rnn, "gru")
    for k, lc in enumerate(layers):
        lc["linear_before_reset"] = False
        pre = f"layers.{k}.fw."
        b_n = np.concatenate([np.zeros(16, np.float32), tensors[pre + "b_hn"]])
        tensors[pre + "bias"] = tensors[pre + "bias"] + b_n
        tensors[pre + "b_hn"] = np.zeros(8, np.float32)
    b = head.bias.detach().numpy().copy()
    b[EOS] += eos_bias
    tensors.update({"embedding": emb.weight.detach().numpy(), "head.weight": head.weight.detach().numpy(),
                    "head.bias": b})
    cfg = fmt.make_config(layers, embedding={"vocab_size": V, "dim": 6}, tokenizer=CHAR_TOK,
                          head={"output_size": V, "input_size": 8, "tied": False, "bias": True})
    return load(fmt.write_model(tmp_path / "lbr0", cfg, tensors, vocab_of(V)))


def torch_greedy(mods, seq, steps, eos=EOS, min_new=0):
    """Argmax decoding in PyTorch: (new ids without the final eos, summed log-prob, ended)."""
    emb, rnn, head = mods
    out, total = [], 0.0
    with torch.no_grad():
        o, st = rnn(emb(torch.tensor(seq)[:, None]))
        for t in range(steps):
            lp = torch.log_softmax(head(o[-1, 0]).double(), -1)
            masked = lp.clone()
            if t < min_new:
                masked[eos] = -np.inf
            v = int(torch.argmax(masked))
            total += float(lp[v])
            if v == eos:
                return out, total, True
            out.append(v)
            o, st = rnn(emb(torch.tensor([[v]])), st)
    return out, total, False


def own_log_prob(model, prompt, ids, ended):
    """The model's own log-prob of ids (+ eos) after [start] + prompt, through Model.target_log_probs."""
    seq = [EOS] + list(prompt) + list(ids) + ([EOS] if ended else [])
    lp, _ = model.target_log_probs(np.array(seq[:-1])[:, None], np.array(seq[1:])[:, None])
    return float(lp[len(prompt):].sum(dtype=np.float64))


def first_token_probs(mods, prompt_ids, temperature=1.0):
    emb, rnn, head = mods
    with torch.no_grad():
        o, _ = rnn(emb(torch.tensor([EOS] + prompt_ids)[:, None]))
        return torch.softmax(head(o[-1, 0]).double() / temperature, -1).numpy()


def chi_square_ok(counts, probs):
    """Pearson's statistic over bins with expected count >= 5 (the rest pooled) below the p=0.001 value."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if exp[~big].sum() > 0:
        obs_b.append(counts[~big].sum())
        exp_b.append(exp[~big].sum())
    stat = sum((o - e) ** 2 / e for o, e in zip(obs_b, exp_b))
    return stat < CHI2_999[len(obs_b) - 2], stat


# --------------------------------------------------------------------------- greedy

@pytest.mark.parametrize("key", list(CELLS))
def test_greedy_equals_torch_argmax_loop(key, tmp_path):
    model, mods = lm(tmp_path, key, eos_bias=1.0)
    prompt = [3, 1, 4]
    ref_ids, ref_lp, ref_end = torch_greedy(mods, [EOS] + prompt, 15)
    for engine in ("compiled", "step"):
        (h,) = model.generate("cad", max_new_tokens=15, engine=engine)
        assert h.ids == ref_ids and h.ended == ref_end
        assert h.text == "".join(vocab_of(12)[i] for i in ref_ids)
        assert_close(h.log_prob, ref_lp, atol=1e-4)
        assert_close(h.score, ref_lp / (len(ref_ids) + ref_end))
    assert model.generate_ids(prompt, max_new_tokens=15)[0].ids == ref_ids


def test_min_new_tokens_and_stop_at_eos(tmp_path):
    model, mods = lm(tmp_path, "lstm", eos_bias=4.0)
    assert torch_greedy(mods, [EOS, 2], 10)[0] == []  # eos comes first without a minimum
    (h,) = model.generate("b", max_new_tokens=10)
    assert h.ids == [] and h.ended
    ref_ids, ref_lp, ref_end = torch_greedy(mods, [EOS, 2], 10, min_new=3)
    (h,) = model.generate("b", max_new_tokens=10, min_new_tokens=3)
    assert len(h.ids) >= 3 and h.ids == ref_ids and h.ended == ref_end
    assert_close(h.log_prob, ref_lp, atol=1e-4)
    for method in ("beam", "sample"):
        hyps = model.generate("b", method=method, max_new_tokens=10, min_new_tokens=2, num_hypotheses=3, seed=0)
        assert all(len(x.ids) >= 2 for x in hyps)
    (h,) = model.generate("b", max_new_tokens=7, stop_at_eos=False)
    assert len(h.ids) == 7 and EOS in h.ids and not h.ended
    assert_close(h.log_prob, own_log_prob(model, [2], h.ids, False), atol=1e-4)


def test_batch_of_prompts_equals_each_alone(tmp_path):
    model, _ = lm(tmp_path, "gru", eos_bias=1.0)
    prompts = ["ab", "", "cbad"]
    for kw in (dict(), dict(method="beam", beam_size=3, num_hypotheses=2)):
        batch = model.generate(prompts, max_new_tokens=9, **kw)
        assert len(batch) == 3
        for p, hyps in zip(prompts, batch):
            alone = model.generate(p, max_new_tokens=9, **kw)
            assert [h.ids for h in hyps] == [h.ids for h in alone]
            assert_close([h.log_prob for h in hyps], [h.log_prob for h in alone], atol=1e-5)
    ids_batch = model.generate_ids([[1, 2], [3]], max_new_tokens=5)
    assert ids_batch[1][0].ids == model.generate_ids([3], max_new_tokens=5)[0].ids


# --------------------------------------------------------------------------- beam search

def test_beam_size_one_is_greedy(tmp_path):
    model, _ = lm(tmp_path, "lstmp", eos_bias=1.0)
    g = model.generate("ab", max_new_tokens=12)[0]
    b = model.generate("ab", method="beam", beam_size=1, max_new_tokens=12)[0]
    assert b.ids == g.ids and b.ended == g.ended
    assert_close(b.log_prob, g.log_prob, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_finds_the_exhaustive_optimum(alpha, tmp_path):
    """V=4, 4 new tokens: every hypothesis (ended by eos or not) scored by the model itself."""
    model, _ = lm(tmp_path, "lstm", V=4, eos_bias=0.5)
    cands = [(list(s), False) for s in itertools.product(range(1, 4), repeat=4)]
    cands += [(list(s), True) for n in range(4) for s in itertools.product(range(1, 4), repeat=n)]
    scored = sorted(((own_log_prob(model, [], ids, e) / (len(ids) + e) ** alpha, ids, e) for ids, e in cands),
                    key=lambda x: -x[0])
    hyps = model.generate_ids([], method="beam", beam_size=128, num_hypotheses=5, max_new_tokens=4,
                              length_penalty=alpha)
    assert [(h.ids, h.ended) for h in hyps] == [(ids, e) for _, ids, e in scored[:5]]
    assert_close([h.score for h in hyps], [s for s, _, _ in scored[:5]], atol=1e-5)
    # no eos stop: all 4^4 sequences compete, eos an ordinary token
    seqs = np.array(list(itertools.product(range(4), repeat=4)))
    inputs = np.concatenate([np.zeros((len(seqs), 1), np.int64), seqs[:, :-1]], axis=1)
    lp = model.target_log_probs(inputs.T, seqs.T)[0].sum(axis=0, dtype=np.float64)
    best = np.argsort(-lp, kind="stable")[:5]
    hyps = model.generate_ids([], method="beam", beam_size=64, num_hypotheses=5, max_new_tokens=4, stop_at_eos=False)
    assert [h.ids for h in hyps] == [list(seqs[i]) for i in best]
    assert_close([h.log_prob for h in hyps], lp[best], atol=1e-5)


def test_nbest_sorted_and_equal_to_own_scoring(tmp_path):
    model, _ = lm(tmp_path, "gru", V=12, eos_bias=1.5)
    hyps = model.generate("ba", method="beam", beam_size=6, num_hypotheses=4, max_new_tokens=10,
                          length_penalty=0.6, min_new_tokens=1)
    assert len(hyps) == 4 and any(h.ended for h in hyps)
    scores = [h.score for h in hyps]
    assert scores == sorted(scores, reverse=True)
    for h in hyps:
        assert_close(h.log_prob, own_log_prob(model, [2, 1], h.ids, h.ended), atol=1e-4)
        assert_close(h.score, h.log_prob / (len(h.ids) + h.ended) ** 0.6, atol=1e-6)


# --------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.6), dict(top_k=3), dict(top_p=0.5),
                                dict(top_k=5, top_p=0.7, temperature=1.5)],
                         ids=["plain", "temperature", "top-k", "top-p", "all"])
def test_sample_distribution_matches_softmax(kw, tmp_path):
    model, mods = lm(tmp_path, "lstm", V=12, seed=6)
    p = first_token_probs(mods, [1, 2], kw.get("temperature", 1.0))
    order = np.argsort(-p, kind="stable")
    keep = np.ones(12, bool)
    if kw.get("top_k"):
        keep[order[kw["top_k"]:]] = False
    if kw.get("top_p"):
        q = np.where(keep, p, 0) / p[keep].sum()
        n = int(np.argmax(np.cumsum(q[order]) >= kw["top_p"])) + 1
        keep[order[n:]] = False
    want = np.where(keep, p, 0) / p[keep].sum()
    hyps = model.generate("ab", method="sample", max_new_tokens=1, num_hypotheses=6000, stop_at_eos=False,
                          seed=11, **kw)
    first = np.array([h.ids[0] for h in hyps])
    counts = np.bincount(first, minlength=12)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(keep))
    ok, stat = chi_square_ok(counts[keep], want[keep])
    assert ok, f"chi-square {stat:.1f} over {keep.sum()} tokens"
    lp_model = np.log(first_token_probs(mods, [1, 2]))
    assert_close([h.log_prob for h in hyps[:20]], lp_model[first[:20]], atol=1e-5)  # untempered, uncut


def test_sampling_is_reproducible(tmp_path):
    model, _ = lm(tmp_path, "rnn-tanh", eos_bias=1.0)
    kw = dict(method="sample", max_new_tokens=12, num_hypotheses=4, top_p=0.9)
    a = model.generate("ab", seed=3, **kw)
    b = model.generate("ab", seed=3, **kw)
    c = model.generate("ab", seed=4, **kw)
    assert [h.ids for h in a] == [h.ids for h in b] != [h.ids for h in c]
    scores = [h.score for h in a]
    assert scores == sorted(scores, reverse=True)
    for h in a:
        assert_close(h.log_prob, own_log_prob(model, [1, 2], h.ids, h.ended), atol=1e-4)


# --------------------------------------------------------------------------- compiled == Model.step path

@pytest.mark.parametrize("key", list(CELLS) + ["gru-lbr0"])
def test_compiled_equals_step_path(key, tmp_path, monkeypatch):
    """With and without the layer-0 table; 6 beams and 5 samples run the 4-row blocks and their tails, 5 and
    9 beams the LSTM's closing group of five rows."""
    model = gru_lbr0(tmp_path, V=13) if key == "gru-lbr0" else lm(tmp_path, key, V=13, eos_bias=1.0)[0]
    runs = [dict(), dict(method="beam", beam_size=6, num_hypotheses=3, length_penalty=0.8),
            dict(method="beam", beam_size=5, num_hypotheses=2), dict(method="beam", beam_size=9, num_hypotheses=2),
            dict(method="sample", num_hypotheses=5, seed=7, top_k=6, temperature=0.8)]
    budget = decoding.TABLE_BYTES
    from lstm_infer import recurrent

    monkeypatch.setattr(recurrent, "TABLE_COLUMNS_V", 0)  # an LSTM's shared table without its transpose
    for kw in runs:
        slow = model.generate("ca", max_new_tokens=10, min_new_tokens=1, engine="step", **kw)
        for table in ("whole", "rows", None):  # built whole, filled on demand (dk.fill_rows), none
            monkeypatch.setattr(decoding, "TABLE_BYTES", budget if table == "whole" else 0)
            monkeypatch.setattr(decoding, "TABLE_ROWS_BYTES", budget if table == "rows" else 0)
            model._decode_net = model._table = None  # rebuild the compiled network and an empty token table
            fast = model.generate("ca", max_new_tokens=10, min_new_tokens=1, engine="compiled", **kw)
            net = model._decode_net[0]
            assert len(net[6]) == (13 if table else 0)
            if table == "rows":  # the rows of the tokens fed in ('a', then the new ones), right, and no others
                have, tab, d = net[14], net[6], model.layers[0].dirs[0]
                want = (np.asarray(model.embedding) @ np.asarray(d.w_ih).T + d.bias).reshape(tab.shape)
                assert have[1] and all(have[i] for h in fast for i in h.ids[:-1])
                assert_close(tab[have], want[have])
                assert not tab[~have].any()
            assert [(h.ids, h.ended) for h in fast] == [(h.ids, h.ended) for h in slow], (kw, table)
            assert_close([h.log_prob for h in fast], [h.log_prob for h in slow], atol=1e-5)


@pytest.mark.parametrize("whole", [True, False])
def test_decoder_shares_the_scoring_token_table(whole, tmp_path, monkeypatch):
    """An LSTM's decoder reads scoring's token table (built whole, or rows filled on demand by the decoder's
    steps) instead of a second copy, and a text scores the same floats whether scoring or a generate
    filled its rows. A GRU keeps a table of its own."""
    from lstm_infer import recurrent

    monkeypatch.setattr(recurrent, "TABLE_COLUMNS_V", 0)  # rows only: the decoder may fill them itself
    monkeypatch.setattr(decoding, "TABLE_BYTES", decoding.TABLE_BYTES if whole else 0)
    ids = np.random.default_rng(3).integers(0, 13, (9, 2))
    fresh = lm(tmp_path / "a", V=13)[0]
    want, _ = fresh.target_log_probs(ids, ids)
    model = lm(tmp_path / "b", V=13)[0]
    out = model.generate("ca", max_new_tokens=12, min_new_tokens=12, engine="compiled")
    net, tab = model._decode_net[0], model._table
    assert np.shares_memory(net[6], tab.rows) and net[14] is tab.have
    fed = {1} | set(out[0].ids[:-1])  # 'a' (the prompt's last token) and the new ones before the last
    assert set(np.flatnonzero(tab.have)) == (set(range(13)) if whole else fed)
    got, _ = model.target_log_probs(ids, ids)
    np.testing.assert_array_equal(got, want)
    gru = gru_lbr0(tmp_path / "g", V=13)
    gru.generate("ca", max_new_tokens=3, engine="compiled")
    assert gru._table is None and len(gru._decode_net[0][6]) == 13


def test_fallback_model_matches_numpy_reference(tmp_path):
    """Peepholes are not in the compiled loops: Model.step decodes, checked against tests/naive.py."""
    rng = np.random.default_rng(8)
    V, E, H = 10, 5, 7
    u = lambda *s: rng.uniform(-0.8, 0.8, s).astype(np.float32)
    t = {"layers.0.fw.w_ih": u(4 * H, E), "layers.0.fw.w_hh": u(4 * H, H), "layers.0.fw.bias": u(4 * H),
         "layers.0.fw.peephole": u(3, H), "embedding": u(V, E), "head.weight": u(V, H), "head.bias": u(V)}
    cfg = fmt.make_config([fmt.layer_config("lstm", E, H, peepholes=True)], embedding={"vocab_size": V, "dim": E},
                          head={"output_size": V, "input_size": H, "tied": False, "bias": True}, tokenizer=CHAR_TOK)
    model = load(fmt.write_model(tmp_path / "peep", cfg, t, vocab_of(V)))
    # the start symbol, then the prompt "b" (id 2), then argmax
    h, c, total, ids = np.zeros(H), np.zeros(H), 0.0, []

    def step(tok, h, c):
        gx = t["embedding"][tok].astype(np.float64) @ t["layers.0.fw.w_ih"].T
        return naive.lstm_step(gx, h @ t["layers.0.fw.w_hh"].T, t["layers.0.fw.bias"], t["layers.0.fw.peephole"],
                               None, False, c)[::-1]

    h, c = step(2, *step(EOS, h, c))
    ended = False
    for _ in range(12):
        lp = naive.log_softmax(h @ t["head.weight"].T + t["head.bias"])
        tok = int(np.argmax(lp))
        total += lp[tok]
        if tok == EOS:
            ended = True
            break
        ids.append(tok)
        h, c = step(tok, h, c)
    (hyp,) = model.generate("b", max_new_tokens=12)
    assert hyp.ids == ids and hyp.ended == ended
    assert_close(hyp.log_prob, total, atol=1e-4)
    beam = model.generate("b", method="beam", beam_size=1, max_new_tokens=12)[0]
    assert beam.ids == ids
    with pytest.raises(LstmInferError, match="compiled decoder does not cover"):
        model.generate("b", engine="compiled")


# --------------------------------------------------------------------------- streaming

def test_generate_tokens_streams_the_same_text(tmp_path):
    model, _ = lm(tmp_path, "lstm", eos_bias=0.5)
    for kw in (dict(), dict(method="sample", seed=2, top_k=5)):
        pieces = list(model.generate_tokens("ab", max_new_tokens=20, **kw))
        assert "".join(pieces) == model.generate("ab", max_new_tokens=20, **kw)[0].text
        assert len(pieces) == len(model.generate("ab", max_new_tokens=20, **kw)[0].ids)


@pytest.mark.parametrize("kind", ["word", "byte"])
def test_generate_tokens_word_and_byte(kind, tmp_path):
    if kind == "word":
        vocab = ["</s>"] + [f"w{i}" for i in range(11)]
        tok = {"kind": "word", "bos": None, "eos": "</s>", "unk": None}
    else:
        vocab = [chr(i) for i in range(256)]
        tok = {"kind": "byte", "bos": None, "eos": "\n", "unk": None}
    emb, rnn, head = lm_modules("lstm", 9, V=len(vocab), E=6, H=8)
    model = engine_from_torch(rnn, "lstm", tmp_path, embedding=emb, head=head, vocab=vocab, tokenizer=tok)
    prompt = "w1 w2" if kind == "word" else "hi"
    for seed in range(3):
        kw = dict(method="sample", seed=seed, max_new_tokens=25)
        text = "".join(model.generate_tokens(prompt, **kw))
        assert text == model.generate(prompt, **kw)[0].text


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kw,match", [
    (dict(method="beam", beam_size=0), "beam_size"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(method="sample", temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(method="nucleus"), "method"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=5, max_new_tokens=3), "min_new_tokens"),
    (dict(method="beam", beam_size=2, num_hypotheses=3), "num_hypotheses"),
    (dict(num_hypotheses=2), "num_hypotheses"),
    (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(seed=-1), "seed"),
    (dict(beams=3), "unknown decoding option"),
])
def test_bad_options(kw, match, tmp_path):
    model, _ = lm(tmp_path, "rnn-tanh")
    with pytest.raises(LstmInferError, match=match) as err:
        model.generate("a", **kw)
    assert "\n" not in str(err.value)


def test_models_that_cannot_generate(tmp_path):
    torch.manual_seed(0)
    emb, head = nn.Embedding(12, 6), nn.Linear(16, 12)
    bi = nn.LSTM(6, 8, bidirectional=True)
    for m in (emb, head, bi):
        scramble(m, 1)
    model = engine_from_torch(bi, "lstm", tmp_path / "bi", embedding=emb, head=head, vocab=vocab_of(12),
                              tokenizer=CHAR_TOK)
    errors = []
    with pytest.raises(LstmInferError, match="left to right") as e:
        model.generate("a")
    errors.append(e)
    no_head = engine_from_torch(nn.LSTM(6, 8), "lstm", tmp_path / "nohead", embedding=emb)
    with pytest.raises(LstmInferError, match="embedding and an output head") as e:
        no_head.generate_ids([1])
    errors.append(e)
    plain = engine_from_torch(nn.LSTM(6, 16), "lstm", tmp_path / "notok", embedding=emb, head=head)
    with pytest.raises(LstmInferError, match="tokenizer") as e:
        plain.generate("a")
    errors.append(e)
    with pytest.raises(LstmInferError, match="start symbol") as e:
        plain.generate_ids([])
    errors.append(e)
    assert len(plain.generate_ids([3, 4], max_new_tokens=3)[0].ids) == 3  # no eos: runs to the limit
    with pytest.raises(LstmInferError, match="out of range") as e:
        plain.generate_ids([12])
    errors.append(e)
    words = ["</s>"] + [f"w{i}" for i in range(11)]
    wm = engine_from_torch(nn.LSTM(6, 16), "lstm", tmp_path / "word", embedding=emb, head=head, vocab=words,
                           tokenizer={"kind": "word", "bos": None, "eos": "</s>", "unk": None})
    with pytest.raises(LstmInferError, match="not in the vocabulary") as e:
        wm.generate("w1 zebra")
    errors.append(e)
    with pytest.raises(LstmInferError, match="generate_tokens") as e:
        wm.generate_tokens("w1", method="beam")
    errors.append(e)
    assert all("\n" not in str(x.value) for x in errors)


def test_threads_one_gives_the_same_tokens(tmp_path):
    a, _ = lm(tmp_path / "a", "lstm", eos_bias=0.5, threads=1)
    b, _ = lm(tmp_path / "b", "lstm", eos_bias=0.5)
    for kw in (dict(), dict(method="beam", num_hypotheses=2)):
        assert [h.ids for h in a.generate("ab", **kw)] == [h.ids for h in b.generate("ab", **kw)]


def test_cli_generate(tmp_path):
    import json

    from click.testing import CliRunner

    from lstm_infer.cli import main

    model, _ = lm(tmp_path, "lstm", eos_bias=0.5)
    path = str(model.path)
    run = lambda *args: CliRunner().invoke(main, ["generate", *args, "-m", path, "--max-tokens", "12"])  # noqa: E731
    r = run("ab")
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == "ab" + model.generate("ab", max_new_tokens=12)[0].text
    r = run("ab", "--method", "beam", "--num-hypotheses", "2", "--format", "json")
    hyps = json.loads(r.stdout)["hypotheses"]
    assert [h["ids"] for h in hyps] == [h.ids for h in model.generate("ab", method="beam", num_hypotheses=2,
                                                                      max_new_tokens=12)]
    r = run("ab", "--method", "sample", "--temperature", "0")
    assert r.exit_code == 1 and "temperature must be > 0" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("threads", [2, 3])
def test_gang_decoder_equals_step_path(threads, tmp_path, monkeypatch):
    """Greedy and sampled rows and beams on a gang of threads (dk.decode_rows_gang, dk.beam_search_gang:
    2-layer LSTM, H = 20 in two panels, with and without the layer-0 table) = Model.step's tokens and
    log-probs, and the gang really ran. A streaming advance of one step at a time stays on the parallel
    regions."""
    emb, rnn, head = lm_modules("lstm", 5, V=13, E=6, H=20, num_layers=2)
    model = engine_from_torch(rnn, "lstm", tmp_path, embedding=emb, head=head, vocab=vocab_of(13),
                              tokenizer=CHAR_TOK, threads=threads)
    from lstm_infer import recurrent

    monkeypatch.setattr(recurrent, "TABLE_COLUMNS_V", 0)  # the shared token table without its transpose
    calls = []
    for name in ("decode_rows_gang", "beam_search_gang"):
        real = getattr(dk, name)
        monkeypatch.setattr(dk, name, lambda *a, real=real: calls.append(a[-2]) or real(*a))
    budget = decoding.TABLE_BYTES
    for kw in (dict(), dict(method="sample", num_hypotheses=7, seed=3, top_k=5, temperature=0.9),
               dict(method="sample", num_hypotheses=3, seed=4, top_p=0.8, min_new_tokens=12),
               dict(method="beam", beam_size=5, num_hypotheses=3, length_penalty=0.8, min_new_tokens=3),
               dict(method="beam", beam_size=7, num_hypotheses=2, stop_at_eos=False)):
        slow = model.generate("ab", max_new_tokens=20, engine="step", **kw)
        for table in ("whole", "rows", None):
            # without the whole table (13 x 80 floats) but with the head's panels (13 x 20)
            monkeypatch.setattr(decoding, "TABLE_BYTES", budget if table == "whole" else 13 * 40 * 4)
            monkeypatch.setattr(decoding, "TABLE_ROWS_BYTES", budget if table == "rows" else 0)
            model._decode_net = model._table = None  # an empty token table: the gang fills its rows
            calls.clear()
            fast = model.generate("ab", max_new_tokens=20, engine="compiled", **kw)
            assert len(model._decode_net[0][6]) == (13 if table else 0) and len(model._decode_net[0][13])
            assert sorted(calls) == list(range(model.threads)), (kw, table)  # every member ran once
            assert [(h.ids, h.ended) for h in fast] == [(h.ids, h.ended) for h in slow], (kw, table)
            assert_close([h.log_prob for h in fast], [h.log_prob for h in slow], atol=1e-5)
    calls.clear()
    pieces = list(model.generate_tokens("ab", max_new_tokens=5))
    assert pieces and not calls
