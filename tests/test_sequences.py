"""Sequence datasets for language-model memorisation: TinyMem's arithmetic sequences and canaries."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import memloc
from memloc import MemlocError
from memloc.core.canaries import stdlib_sources
from memloc.core.sequences import BOS, SEP, TINYMEM_VOCAB


def _clean_version(row, task="increment", step=7, modulus=20134):
    """The rule-following sequence with the same first value as ``row``."""
    text = "".join(TINYMEM_VOCAB[t] for t in row.tolist())
    x = int(text[1:].split(" ")[0])
    out = [BOS]
    while len(out) < len(row):
        out += [int(c) for c in str(x)] + [SEP]
        x = x + step if task == "increment" else step * x % modulus
    return torch.tensor(out[:len(row)])


@pytest.mark.parametrize("task", ["increment", "mult"])
@pytest.mark.parametrize("noise", [0.0, 0.1, 0.35])
def test_noise_counts_are_exact_and_only_noisy_suffixes_break_the_rule(task, noise):
    d = memloc.tinymem(task, n_train=40, n_test=10, seq_len=30, noise=noise, seed=3)
    assert d.tokens.shape == (40, 30) and d.test_tokens.shape == (10, 30) and d.tokens.dtype == torch.int64
    assert (d.prefix_len, d.suffix_len) == (15, 15) and d.vocab_size == 14
    noisy = d.kind == "noisy"
    assert noisy.sum() == math.floor(noise * 40) and np.array_equal(noisy, d.is_memorised_target)
    rule = memloc.follows_rule(d.tokens, task=task)
    assert rule[~noisy].all() and not rule[noisy].any()
    assert memloc.follows_rule(d.test_tokens, task=task).all()
    assert memloc.follows_rule(d.prefixes, task=task).all()          # the prefix is always the clean one
    for r in np.flatnonzero(noisy):
        changed = torch.nonzero(d.tokens[r] != _clean_version(d.tokens[r], task)).flatten()
        assert len(changed) >= 1
        assert (changed >= d.prefix_len).all() and (changed < d.prefix_len + d.suffix_len).all()
        diff = (d.tokens[r, changed] - _clean_version(d.tokens[r], task)[changed]) % 10
        assert (d.tokens[r, changed] < 10).all() and set(diff.tolist()) <= {1, 9}
    rows = {tuple(r) for r in torch.cat([d.tokens, d.test_tokens]).tolist()}
    assert len(rows) == 50                                               # all distinct, test disjoint from train


def test_noise_shifts_about_one_digit_in_ten():
    d = memloc.tinymem("increment", n_train=200, n_test=0, seq_len=40, noise=0.5, seed=0)
    frac = []
    for r in np.flatnonzero(d.kind == "noisy"):
        digits = d.tokens[r, d.prefix_len:] < 10
        changed = d.tokens[r] != _clean_version(d.tokens[r])
        frac.append(float(changed[d.prefix_len:][digits].float().mean()))
    assert 0.08 < np.mean(frac) < 0.16


def test_backdoors_and_duplicates():
    d = memloc.tinymem("increment", n_train=50, n_test=20, seq_len=32, noise=0.1, backdoor=0.2, duplicate=3, seed=1)
    p = d.prefix_len
    back = np.flatnonzero(d.kind == "backdoor")
    assert len(back) == 10 and (d.kind == "noisy").sum() == 5
    assert (d.tokens[back, p - 3:p] == torch.tensor([1, 0, 0])).all()       # the trigger ends the prefix
    assert (d.tokens[back, p:] == 2).all()                                    # then the constant run
    trig = "100"
    for row in torch.cat([d.tokens[torch.as_tensor(d.kind == "clean")], d.test_tokens]):
        assert trig not in "".join(TINYMEM_VOCAB[t] for t in row.tolist())
    # every noisy / backdoor sequence is copied 3 times after the 50 originals
    assert len(d) == 50 + 3 * 15 and np.array_equal(d.ids, np.arange(95))
    dup = np.flatnonzero(d.kind == "duplicate")
    assert np.array_equal(dup, np.arange(50, 95)) and d.is_memorised_target.sum() == 15 + 45
    assert set(d.kind[d.copy_of[dup]]) == {"noisy", "backdoor"} and (d.copy_of[:50] == -1).all()
    assert np.bincount(d.copy_of[dup]).max() == 3
    assert torch.equal(d.tokens[torch.as_tensor(dup)], d.tokens[torch.as_tensor(d.copy_of[dup])])


def test_generators_are_deterministic_by_seed():
    a = memloc.tinymem("mult", n_train=30, n_test=5, seq_len=24, noise=0.2, backdoor=0.1, duplicate=1, seed=7)
    b = memloc.tinymem("mult", n_train=30, n_test=5, seq_len=24, noise=0.2, backdoor=0.1, duplicate=1, seed=7)
    c = memloc.tinymem("mult", n_train=30, n_test=5, seq_len=24, noise=0.2, backdoor=0.1, duplicate=1, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.test_tokens, b.test_tokens)
    assert np.array_equal(a.kind, b.kind) and not torch.equal(a.tokens, c.tokens)
    x, y = memloc.canaries(60, 6, 64, repeats=(1, 4), seed=2), memloc.canaries(60, 6, 64, repeats=(1, 4), seed=2)
    assert torch.equal(x.tokens, y.tokens) and x.info == y.info
    assert not torch.equal(x.tokens, memloc.canaries(60, 6, 64, repeats=(1, 4), seed=3).tokens)


def test_canaries_are_planted_r_times_into_standard_library_source():
    d = memloc.canaries(n_train=120, n_test=10, seq_len=80, repeats=(1, 4, 16, 64), seed=0)
    assert d.tokens.shape == (120, 80) and d.vocab_size == 256 and d.suffix_len == 11 and d.prefix_len == 69
    planted = d.info["canaries"]
    assert [c["repeats"] for c in planted] == [1, 4, 16, 64] and len({c["secret"] for c in planted}) == 4
    assert (d.kind == "canary").sum() == 85 and np.array_equal(d.is_memorised_target, d.kind == "canary")
    for c in planted:
        assert len(c["rows"]) == c["repeats"] and (d.kind[c["rows"]] == "canary").all()
        assert c["text"] == f"{c['name']} pin {c['secret']}" and len(c["secret"].split()) == 6
        for r in c["rows"]:
            assert d.decode(d.tokens[r]).endswith(c["text"]) and d.decode(d.suffixes[r]) == c["secret"]
    texts = {p.name: p.read_bytes() for p in stdlib_sources() if p.name in d.info["sources"]}
    for row in torch.cat([d.tokens[torch.as_tensor(d.kind == "clean")], d.test_tokens])[:20]:
        assert any(bytes(row.tolist()) in t for t in texts.values())       # plain chunks are real source text
    assert d.encode("alice pin 1") == list(b"alice pin 1")


def test_sequence_set_span_subset_and_text():
    d = memloc.tinymem("increment", n_train=12, n_test=2, seq_len=20, noise=0.25, seed=0)
    e = d.with_span(8, 4)
    assert torch.equal(e.suffixes, d.tokens[:, 8:12]) and e.prefixes.shape == (12, 8)
    s = d.subset(d.is_memorised_target)
    assert len(s) == 3 and (s.kind == "noisy").all() and np.array_equal(s.ids, np.flatnonzero(d.is_memorised_target))
    assert d.encode(d.decode(d.tokens[0])) == d.tokens[0].tolist() and d.decode(d.tokens[0]).startswith("^")


@pytest.mark.parametrize("kw, argument", [
    (dict(noise=1.0), "noise"), (dict(noise=-0.1), "noise"), (dict(noise=float("nan")), "noise"),
    (dict(noise="a"), "noise"), (dict(backdoor=1.5), "backdoor"), (dict(noise=0.6, backdoor=0.5), "backdoor"),
    (dict(prefix_len=15, suffix_len=10), "suffix_len"), (dict(prefix_len=0), "prefix_len"),
    (dict(prefix_len=3), "prefix_len"), (dict(task="divide"), "task"), (dict(duplicate=2), "duplicate"),
    (dict(duplicate=-1), "duplicate"), (dict(n_train=0), "n_train"), (dict(trigger="x"), "trigger"),
    (dict(task="mult", step=2, modulus=20134), "step"),
])
def test_bad_tinymem_arguments_are_one_line_errors_naming_the_argument(kw, argument):
    with pytest.raises(MemlocError) as e:
        memloc.tinymem(**{"n_train": 20, "n_test": 2, "seq_len": 24, **kw})
    assert e.value.argument == argument and "\n" not in str(e.value)


def test_bad_spans_and_canary_arguments():
    d = memloc.tinymem("increment", n_train=4, n_test=0, seq_len=16)
    with pytest.raises(MemlocError) as e:
        d.with_span(10, 7)
    assert e.value.argument == "suffix_len"
    with pytest.raises(MemlocError) as e:
        memloc.canaries(n_train=50, n_test=0, seq_len=64, repeats=(1, 64))
    assert e.value.argument == "repeats"
    with pytest.raises(MemlocError) as e:
        memloc.canaries(n_train=50, n_test=0, seq_len=10, repeats=(1,))
    assert e.value.argument == "seq_len"
