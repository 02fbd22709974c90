"""Memorisation in language models: the one-pass measures equal real greedy decoding; exposure."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memloc
from memloc import MemlocError
from memloc.core.results import load_result
from memloc.core.sequences import SEP

BOS = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def _greedy_one_by_one(model, prefix, n):
    """A plain greedy decoder: one sequence, one full forward per new token, no cache."""
    x = prefix.reshape(1, -1)
    with torch.no_grad():
        for _ in range(n):
            out = model(x)
            logits = out if torch.is_tensor(out) else out.logits
            x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, prefix.numel():]


def _train_until_partly_memorised(d, model, low, high, max_steps=400):
    """Full-batch AdamW on the training sequences until between ``low`` and ``high`` of them are memorised."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x = d.tokens
    for step in range(1, max_steps + 1):
        loss = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            n = int(memloc.memorisation_from_logits(model(x[:, :-1]), x, d.prefix_len, d.suffix_len)["memorised"].sum())
        if low <= n <= high:
            return step, n
    raise AssertionError(f"never between {low} and {high} memorised sequences (last {n})")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    d = memloc.tinymem("increment", n_train=30, n_test=20, seq_len=24, noise=0.5, seed=0)
    model = memloc.TinyGPT(d.vocab_size, n_layer=2, n_head=2, d_model=64, max_len=24, seed=0)
    step, n = _train_until_partly_memorised(d, model, 10, 20)
    return d, model.eval(), step, n


def test_memorised_iff_greedy_decoding_reproduces_the_suffix(trained, tmp_path):
    d, model, step, n = trained
    res = memloc.memorisation(model, d, eval_batch_size=7, device="cpu")
    mem = res["memorised"].values
    assert mem.sum() == n and 0 < n < len(d)                      # some memorised, some not
    p, s = d.prefix_len, d.suffix_len
    greedy = torch.stack([_greedy_one_by_one(model, d.tokens[r, :p], s) for r in range(len(d))])
    assert np.array_equal((greedy == d.suffixes).all(1).numpy(), mem)
    # the library's batched greedy decoder agrees with the one-by-one loop
    assert torch.equal(memloc.greedy_decode(model, d.prefixes, s), greedy)
    # held-out sequences: same equality (the rule is not learnt from 30 sequences: none reproduced)
    test = memloc.memorisation(model, d, split="test", device="cpu")
    gen = memloc.greedy_decode(model, d.test_tokens[:, :p], s)
    assert np.array_equal(test["memorised"].values, (gen == d.test_tokens[:, p:p + s]).all(1).numpy())
    assert not test["is_target"].values.any() and set(test["kind"].values) == {"clean"}
    # accuracy 1 exactly when memorised; the memorised have the lower suffix losses
    acc, loss = res["suffix_accuracy"].values, res["suffix_loss"].values
    assert np.array_equal(acc == 1.0, mem) and loss[mem].max() < loss[~mem].max()
    assert np.array_equal(res["is_target"].values, d.is_memorised_target)
    assert list(res["kind"].values) == list(d.kind) and np.array_equal(res["sequence"].values, d.ids)
    assert res.config["prefix_len"] == p and res.config["suffix_len"] == s
    back = load_result(res.save(tmp_path / "memorisation.h5"), "memorisation")
    assert back.equals(res) and back["memorised"].dtype == bool
    print(f"\nTinyGPT stopped after {step} steps: {n}/30 memorised "
          f"({int(mem[d.is_memorised_target].sum())}/15 noisy, {int(mem[~d.is_memorised_target].sum())}/15 clean); "
          f"test memorised {int(test['memorised'].values.sum())}/20")


def test_memorisation_equals_transformers_greedy_generate():
    model = memloc.hf_causal_lm("gpt2", vocab_size=14, n_layer=2, n_head=2, d_model=32, max_len=32, seed=0)
    g = torch.Generator().manual_seed(0)
    p, s = 6, 8
    prompts = torch.randint(0, 14, (12, p), generator=g)
    with torch.no_grad():
        gen = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=s, do_sample=False,
                             pad_token_id=13)[:, p:]
    tokens = torch.cat([prompts, gen], dim=1)
    # rows 4..7 change one suffix token, rows 8..11 get a random suffix
    for r in range(4, 8):
        j = p + 2 * (r - 4)
        tokens[r, j] = (tokens[r, j] + 1 + r) % 14
    tokens[8:, p:] = torch.randint(0, 14, (4, s), generator=g)
    mem = memloc.memorisation_from_logits(memloc.lm_logits(model, tokens[:, :-1]), tokens, p, s)["memorised"]
    with torch.no_grad():
        again = model.generate(tokens[:, :p], attention_mask=torch.ones_like(prompts), max_new_tokens=s,
                               do_sample=False, pad_token_id=13)
    reproduced = (again[:, p:] == tokens[:, p:]).all(1).numpy()
    assert np.array_equal(mem, reproduced) and mem[:4].all() and not mem[4:8].any()
    for family in ("gpt_neox", "llama"):
        lm = memloc.hf_causal_lm(family, vocab_size=14, n_layer=1, n_head=2, d_model=16, max_len=32, seed=1)
        assert memloc.lm_logits(lm, tokens).shape == (12, p + s, 14)
        assert torch.equal(memloc.greedy_decode(lm, prompts[:2], 3),
                           torch.stack([_greedy_one_by_one(lm, prompts[i], 3) for i in range(2)]))


def test_memorisation_from_logits_known_answers():
    tokens = torch.tensor([[10, 1, 2, 3, 4], [10, 1, 2, 3, 4], [10, 1, 2, 3, 4]])
    logits = torch.zeros(3, 4, 14)
    logits[0, torch.arange(4), tokens[0, 1:]] = 5.0                  # right everywhere
    logits[1, torch.arange(4), tokens[1, 1:]] = 5.0
    logits[1, 2, 9] = 6.0                                             # wrong at the 2nd suffix token
    out = memloc.memorisation_from_logits(logits, tokens, 2, 3)       # suffix: tokens 2, 3, 4
    assert out["memorised"].tolist() == [True, False, False]
    assert out["suffix_accuracy"].tolist() == [1.0, 2 / 3, 0.0]       # row 2: all-zero logits, argmax is token 0
    assert out["suffix_loss"][2] == pytest.approx(math.log(14))
    assert out["suffix_loss"][0] == pytest.approx(-math.log(math.exp(5) / (math.exp(5) + 13)))
    assert out["suffix_loss"].dtype == np.float64 and out["memorised"].dtype == bool


class Bigram(nn.Module):
    """A hand-built causal LM: the logits after token a are row a of ``table``."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, x):
        return self.table(x)


def test_exposure_known_answers():
    space = memloc.digit_space(4)
    secret = [3, 8, 1, 4]
    top = math.log2(10_000)
    likely, unlikely = torch.zeros(14, 14), torch.zeros(14, 14)
    for a, b in zip([SEP] + secret, secret):
        likely[a, b], unlikely[a, b] = 10.0, -10.0
    assert memloc.exposure(Bigram(likely), [SEP], secret, space, device="cpu") == pytest.approx(top)
    assert memloc.exposure(Bigram(unlikely), [SEP], secret, space, device="cpu") == pytest.approx(0.0)
    first = torch.zeros(14, 14)
    first[SEP, :10] = torch.arange(10.0)                              # only the first digit matters: 7 < 8, 9
    assert memloc.exposure(Bigram(first), [SEP], [7, 0, 0, 0], space, device="cpu") == \
        pytest.approx(top - math.log2(2001))
    # every candidate equally likely: ties count for the secret
    assert memloc.exposure(Bigram(torch.zeros(14, 14)), [SEP], secret, space, device="cpu") == pytest.approx(top)
    # an explicit candidate list gives the same as the space
    rows = space.enumerate()
    assert rows.shape == (10_000, 4) and memloc.exposure(Bigram(first), [SEP], [7, 0, 0, 0], rows[::7],
                                                         device="cpu") == pytest.approx(
        math.log2(len(rows[::7])) - math.log2(1 + int((rows[::7, 0] > 7).sum())))
    canary_space = memloc.digit_space(6, digits=range(48, 58), separator=32)
    assert canary_space.size == 10 ** 6 and list(b"3 8 1 4 9 2") in canary_space


def test_exposure_estimate_matches_the_exact_exposure():
    torch.manual_seed(0)
    model = Bigram(torch.randn(14, 14) * 1.5)
    space = memloc.digit_space(4)
    rows = space.enumerate()
    ll = memloc.sequence_log_likelihood(model, [BOS], rows, device="cpu")
    order = np.argsort(-ll, kind="stable")
    for k in (99, 999):
        secret = rows[order[k]]
        exact = memloc.exposure(model, [BOS], secret, space, device="cpu")
        assert exact == pytest.approx(math.log2(10_000 / (k + 1)))
        for method in ("skewnorm", "empirical"):
            est = memloc.exposure_estimate(model, [BOS], secret, space, samples=10_000, method=method, device="cpu")
            assert abs(est - exact) < 0.5, (k, method, est, exact)


def test_tiny_gpt_layout():
    m = memloc.TinyGPT(14, n_layer=3, n_head=2, d_model=16, d_mlp=40, max_len=12, seed=0)
    ups = [n for n, mod in m.named_modules() if n.endswith("mlp.up")]
    assert ups == ["blocks.0.mlp.up", "blocks.1.mlp.up", "blocks.2.mlp.up"] and m.blocks[0].mlp.up.out_features == 40
    assert m.blocks[0].mlp.down.in_features == 40
    assert torch.equal(m.tok.weight, memloc.TinyGPT(14, 3, 2, 16, 40, 12, seed=0).tok.weight)
    x = torch.randint(0, 14, (2, 12))
    y = m(x)
    assert y.shape == (2, 12, 14) and torch.allclose(m(x[:, :5]), y[:, :5], atol=1e-6)    # causal
    with pytest.raises(MemlocError) as e:
        m(torch.zeros(1, 13, dtype=torch.long))
    assert e.value.argument == "tokens"
    with pytest.raises(MemlocError) as e:
        memloc.TinyGPT(14, n_head=3, d_model=16)
    assert e.value.argument == "d_model"
    with pytest.raises(MemlocError) as e:
        memloc.hf_causal_lm("bert")
    assert e.value.argument == "family"


def test_error_paths_name_the_argument():
    tokens = torch.randint(0, 14, (3, 10))

    def arg(fn, *a, **kw):
        with pytest.raises(MemlocError) as e:
            fn(*a, **kw)
        assert "\n" not in str(e.value)
        return e.value.argument

    f = memloc.memorisation_from_logits
    assert arg(f, torch.zeros(3, 9, 14), tokens, 5, 6) == "suffix_len"          # prefix + suffix > T
    assert arg(f, torch.zeros(3, 9, 14), tokens, 0, 5) == "prefix_len"
    assert arg(f, torch.zeros(3, 9), tokens, 5, 5) == "logits"
    assert arg(f, torch.zeros(2, 9, 14), tokens, 5, 5) == "logits"
    assert arg(f, torch.zeros(3, 6, 14), tokens, 5, 5) == "logits"                # too short for the suffix
    assert arg(f, torch.zeros(3, 9, 4), torch.full((3, 10), 13), 5, 5) == "tokens"   # ids beyond the V logits
    d = memloc.tinymem("increment", n_train=4, n_test=1, seq_len=16)
    model = memloc.TinyGPT(14, 1, 1, 8, max_len=16)
    assert arg(memloc.memorisation, "model", d) == "source"
    assert arg(memloc.memorisation, model, tokens) == "data"
    assert arg(memloc.memorisation, model, d, split="valid") == "split"
    assert arg(memloc.memorisation, model, d, eval_batch_size=0) == "eval_batch_size"
    assert arg(memloc.memorisation, model, d, precision="fp8") == "precision"
    assert arg(memloc.lm_logits, lambda x: x.float(), tokens) == "model"
    bigram, space = Bigram(torch.zeros(14, 14)), memloc.digit_space(4)
    assert arg(memloc.exposure, bigram, [SEP], [3, 8, 1], space) == "secret"
    assert arg(memloc.exposure, bigram, [SEP], [3, 8, 1, 4], space.enumerate()[:10]) == "secret"
    assert arg(memloc.exposure, bigram, [SEP], [3, 8, 1, 4], np.zeros((5, 3), dtype=int)) == "candidates"
    assert arg(memloc.exposure, bigram, [], [3, 8, 1, 4], space) == "prefix"
    assert arg(memloc.exposure, bigram, [SEP], [3] * 7, memloc.digit_space(7)) == "candidates"   # 10^7: too many
    assert arg(memloc.exposure_estimate, bigram, [SEP], [3, 8, 1, 4], space, method="kde") == "method"
    assert arg(memloc.exposure_estimate, bigram, [SEP], [3, 8, 1, 4], space, samples=1) == "samples"


@pytest.mark.slow
def test_the_readme_language_model_example_runs_and_prints_what_it_says():
    """The language-model program of docs/tutorials/language-models.md, run as written: every noisy
    sequence is memorised and almost none of the held-out ones."""
    import subprocess
    import sys
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "language-models.md").read_text()
    code = readme.split("<!-- example: lm", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    rates = dict(line.split() for line in out.splitlines() if line.split()[:1] in (["clean"], ["noisy"]))
    assert float(rates["noisy"]) == 1.0 and float(rates["clean"]) >= 0.9
    assert float(out.split("held out:")[1]) < 0.5
