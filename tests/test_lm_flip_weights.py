"""memloc.flip's weight site and input noise on language-model runs (issue 23): individual weights of the
blocks' projections zeroed by the official rule until the suffix is no longer reproduced, and Maini's
input noise as Gaussian noise on the token embeddings. Both against plain one-sequence-at-a-time
references in float64 (the noise written out: the model run from its noised token embeddings), the
command line, and what is still refused."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memloc
from memloc.analyses.flip.search import noise_seed
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.lm import sequence_measures
from memloc.core.units import trace, unit_masks

from conftest import results_free_copy
from test_lm_flip import _rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, rows, emb=None):
    """(N, T, V) logits of token ``rows`` (N, T), the first ``len(emb)`` rows' token embeddings replaced by
    ``emb``: TinyGPT's forward written out, a transformers model through ``inputs_embeds``."""
    hf = hasattr(model, "transformer")
    tok = model.transformer.wte if hf else model.tok
    e = tok(rows)
    if emb is not None:
        e = torch.cat([emb, e[len(emb):]])
    if hf:
        return model(inputs_embeds=e, use_cache=False).logits
    x = e + model.pos(torch.arange(rows.shape[1]))
    for block in model.blocks:
        x = block(x)
    return model.head(model.ln_f(x))


def _noised(model, row, samples, ratio, seed):
    """``samples`` copies of ``row``'s token embeddings plus Gaussian noise of norm ``ratio`` x theirs."""
    e = (model.transformer.wte if hasattr(model, "transformer") else model.tok)(row[None])[0]
    z = torch.randn((samples, *e.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return e + z * (ratio * e.norm() / z.flatten(1).norm(dim=1)).view(-1, 1, 1)


def reference(model, tokens, target_id, ref_tokens, ref_ids, p, s, *, max_units, params=None, structure=None,
              noise=None, seed=0, repeat=0):
    """One search written plainly (float64). ``params``: the weight site on these parameters (zero the item of
    highest positive weight x gradient, first in named_parameters order; none above 0: stop, not flipped);
    else the unit site on ``structure``. ``noise`` (samples, ratio): the target's logits averaged over
    copies whose token embeddings carry noise drawn from noise_seed(seed, target, repeat, step)."""
    model = copy.deepcopy(model).double().eval().requires_grad_(False)
    rows = torch.cat([tokens[None], ref_tokens])[:, :p + s - 1]
    keep = torch.as_tensor(np.asarray(ref_ids)) != target_id
    named = dict(model.named_parameters())
    weights = [named[k].requires_grad_(True) for k in params or ()]
    mask = torch.ones(structure.n_units if structure else 1, dtype=torch.float64)
    chosen, n = [], 1 if noise is None else noise[0]
    cap = min(max_units, sum(w.numel() for w in weights) if params else structure.n_units)
    while True:
        m = mask.clone().requires_grad_(True)
        emb = None if noise is None else _noised(model, rows[0], *noise, noise_seed(seed, target_id, repeat, len(chosen)))
        x = torch.cat([rows[:1].expand(n, -1), rows[1:]])
        with torch.enable_grad(), unit_masks(model, structure, m) if structure else contextlib.nullcontext():
            logits = _logits(model, x, emb)[:, p - 1:]
        with torch.enable_grad():
            target = logits[:n].mean(0)
            if not torch.equal(target.argmax(-1), tokens[p:p + s]):
                return chosen, True
            if len(chosen) == cap:
                return chosen, False
            loss = F.cross_entropy(target, tokens[p:p + s])
            ref = torch.stack([F.cross_entropy(logits[n + i], ref_tokens[i, p:p + s]) for i in range(len(ref_tokens))])
            objective = ref[keep].mean() - loss
        if params is None:
            grad, = torch.autograd.grad(objective, m)
            j = int((grad * mask).masked_fill(mask == 0, float("-inf")).argmax())
            mask[j] = 0
        else:
            score = torch.cat([(w * g).flatten() for w, g in zip(weights, torch.autograd.grad(objective, weights))])
            if not score.max() > 0:
                return chosen, False
            j, offset = int(score.argmax()), 0
            for w in weights:
                if j < offset + w.numel():
                    with torch.no_grad():
                        w.view(-1)[j - offset] = 0
                    break
                offset += w.numel()
        chosen.append(j)


def _projections(model):
    """The blocks' projections' weights and biases (every linear / Conv1D layer but the logits layer)."""
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    names -= {"head", "lm_head"}
    return [k for k, _ in model.named_parameters() if k.rpartition(".")[0] in names]


def _check(source, data, model, *, examples, ref_batch_size, max_units, site, noise_samples=0, noise_ratio=0.01,
           seed=0):
    res = memloc.flip(source, data if source is model else None, examples=examples, ref_batch_size=ref_batch_size,
                      ref_pool="all", max_units=max_units, site=site, dtype="float64", group_size=3, device="cpu",
                      noise_samples=noise_samples, noise_ratio=noise_ratio, seed=seed, resume=None)
    params = _projections(model) if site == "weight" else None
    structure = None if params else trace(model, data.tokens[:2])
    assert list(res["layer"].values) == (params or [sp.name for sp in structure.spaces])
    refs, p, s = res["reference"].values, data.prefix_len, data.suffix_len
    got = _rows(res)
    for (e, r), value in got.items():
        want = reference(model, data.tokens[e], e, data.tokens[torch.as_tensor(refs[r])], refs[r], p, s,
                         max_units=max_units, params=params, structure=structure, seed=seed,
                         noise=(noise_samples, noise_ratio) if noise_samples else None)
        assert value == want, f"sequence {e}"
    assert res.config.get("noised") == ("token_embeddings" if noise_samples else None)
    assert not any(m._forward_hooks for m in model.modules())      # no hook left behind
    return res, got


def _chosen(run, data):
    memorised = sequence_measures(run.model(), data.tokens, data.prefix_len, data.suffix_len)["memorised"]
    targets = np.flatnonzero(data.is_memorised_target & memorised)
    return [int(targets[0]), int(targets[5]), int(targets[9]), int(np.flatnonzero(~memorised)[0])], memorised


def test_weight_site_equals_one_sequence_at_a_time_in_float64(memorising_lm):
    """Weights of the blocks' projections, the stop test the suffix's; the unreproduced sequence not searched."""
    run, data = memorising_lm, memorising_lm.data()
    chosen, memorised = _chosen(run, data)
    res, got = _check(run, data, run.model(), examples=chosen, ref_batch_size=12, max_units=40, site="weight")
    np.testing.assert_array_equal(res["status"].values, ~memorised[chosen])
    assert res.config["weight_site_path"] == "dense" and len(got) == 3
    assert all(f for _, f in got.values()) and max(len(u) for u, _ in got.values()) > 1


def test_embedding_noise_equals_the_written_out_reference(memorising_lm):
    """Noise on the token embeddings, at the unit site and at the weight site; with noise_ratio 0 the
    copies are the sequence itself, so the searches are those without noise."""
    run, data = memorising_lm, memorising_lm.data()
    chosen, _ = _chosen(run, data)
    _, noisy = _check(run, data, run.model(), examples=chosen[:3], ref_batch_size=8, max_units=30, site="pre_norm",
                      noise_samples=3, noise_ratio=0.5, seed=4)
    _check(run, data, run.model(), examples=chosen[:2], ref_batch_size=8, max_units=30, site="weight",
           noise_samples=2, noise_ratio=0.5, seed=4)
    kw = dict(examples=chosen[:3], ref_batch_size=8, ref_pool="all", max_units=30, dtype="float64", device="cpu",
              resume=None)
    plain = _rows(memloc.flip(run, **kw))
    assert _rows(memloc.flip(run, noise_samples=3, noise_ratio=0.0, **kw)) == plain
    assert noisy != plain       # the noise (half the embeddings' norm) changes some search


def test_command_site_weight_and_what_is_refused(memorising_lm, tmp_path, capsys):
    run = results_free_copy(memorising_lm, tmp_path / "run")
    res = cli_run("flip", [str(run.path), "--site", "weight", "--examples", "noisy:3", "--max-units", "20",
                           "--device", "cpu"])
    saved = run.result("flip")
    np.testing.assert_array_equal(saved["unit_ids"].values, res["unit_ids"].values)
    assert saved.config["site"] == "weight" and "items" in capsys.readouterr().out
    for argv, match in ((["--site", "weight", "--units", "mlp"], "zeroes parameter items, not units"),
                        (["--protocol", "paper", "--units", "heads"], "set by protocol 'paper'")):
        with pytest.raises(SystemExit) as e:
            cli_run("flip", [str(run.path), "--overwrite", "--device", "cpu", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "use --site pre_norm" in err, err

    class OneHot(nn.Module):          # a language model without an embedding layer: nothing to noise
        def __init__(self, vocab):
            super().__init__()
            self.vocab, self.inner, self.out = vocab, nn.Linear(vocab, 8), nn.Linear(8, vocab)

        def forward(self, tokens):
            return self.out(torch.relu(self.inner(F.one_hot(tokens, self.vocab).float())))

    data = memorising_lm.data()
    with pytest.raises(MemlocError, match="no nn.Embedding taking its token ids.*noise_samples=0"):
        memloc.flip(OneHot(data.vocab_size), data, examples="noisy:2", noise_samples=2, device="cpu")
    # a classifier of token ids: its noise would go on the ids themselves
    from memloc.core.data import Data
    from memloc.core.examples import ExampleSet
    x, y = torch.randint(0, 5, (8, 3)), torch.zeros(8, dtype=torch.int64)
    sets = [ExampleSet(x, y, torch.arange(8)), ExampleSet(x[:0], y[:0], torch.arange(0))]
    tokens = Data("ids", *sets, 3, y.numpy(), y.numpy(), np.zeros(8, bool))
    net = nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(12, 6), nn.Linear(6, 3))
    with pytest.raises(MemlocError, match="inputs are integers.*noise_samples=0"):
        memloc.flip(net, tokens, examples="clean:2", noise_samples=2, device="cpu")


@pytest.mark.slow      # importing transformers takes 5-15 s on 2 busy cores
def test_hf_gpt2_weight_site_and_noise_equal_reference():
    """A GPT-2-config model (Conv1D projections, tied embeddings left out) and sequences it reproduces,
    the noise through the model's own inputs_embeds."""
    from dataclasses import replace

    from memloc.core.lm import greedy_decode, hf_causal_lm
    from memloc.core.sequences import tinymem
    data = tinymem("mult", n_train=12, n_test=4, seq_len=16, suffix_len=4, noise=0.25)
    model = hf_causal_lm("gpt2", data.vocab_size, n_layer=2, d_model=16, n_head=2, max_len=16, seed=0)
    with torch.no_grad():             # (its initial embeddings: scaled up, no projection weights would break them)
        tokens = data.tokens.clone()
        tokens[:, data.prefix_len:data.prefix_len + data.suffix_len] = greedy_decode(model, tokens[:, :data.prefix_len], data.suffix_len)
    data = replace(data, tokens=tokens)
    res, got = _check(model, data, model, examples="noisy:2,clean:2", ref_batch_size=6, max_units=45, site="weight",
                      noise_samples=2, noise_ratio=0.1)
    assert (res["status"].values == 0).all() and any(".mlp.c_fc" in str(n) for n in res["layer"].values)
    assert not any("wte" in str(n) or "ln_" in str(n) for n in res["layer"].values)
    assert len(got) == 4 and sum(f for _, f in got.values()) >= 2 and max(len(u) for u, f in got.values() if f) > 1
