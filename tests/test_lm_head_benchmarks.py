"""INJ, DEL and mitigation with attention heads as the units (``units="heads"``, issue 23): INJ moves only the
injected heads' output-projection columns and Zero-Out finds them; DEL and mitigation zero exactly the heads
they report (checked by zeroing those columns by hand); what does not apply to heads is a one-line error."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import memloc
from memloc.analyses.inj import inject_sequence, recall_at_k
from memloc.analyses.localise import neuron_scores
from memloc.analyses.localise.plots import plot_del, plot_inj
from memloc.analyses.mitigation.methods import FUNCTIONS, Task, mitigation_options
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.lm import TinyGPT, lm_logits, sequence_measures, suffix_measures
from memloc.core.neurons import attention_heads
from conftest import trained_to_memorise

pytestmark = pytest.mark.usefixtures("one_thread")


def zero_heads(model, heads):
    """A copy of ``model`` with the output-projection columns of ``heads`` ({layer: [head, ...]}) set to 0 by hand."""
    model = copy.deepcopy(model)
    layers = attention_heads(model)
    with torch.no_grad():
        for layer, chosen in heads.items():
            g = layers[layer].group
            for k in chosen:
                model.get_submodule(layers[layer].name).weight[:, k * g:(k + 1) * g] = 0
    return model


def top_heads(scores, k):
    """{layer: the top ``k`` heads of ``scores`` (L, n_head) (ties: the lower index)}."""
    return {layer: np.argsort(-row, kind="stable")[:k].tolist() for layer, row in enumerate(scores)}


def test_inj_on_heads_tunes_only_their_columns_and_zero_out_finds_them(tmp_path):
    model = TinyGPT(14, n_layer=2, n_head=4, d_model=32, d_mlp=32, max_len=16, seed=2).eval()
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 14, (1, 8)))
    heads = np.array([[3], [1]])                               # one head per layer (8 input features each)
    assert not bool(suffix_measures(lm_logits(model, x[:, :-1]), x, 5, 3)[2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps, ok = inject_sequence(model, x, 5, 3, heads, lr=0.1, max_steps=300, units="heads")
    assert ok and steps > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["blocks.0.attn.proj.weight", "blocks.1.attn.proj.weight"]
    for name, (k,) in zip(changed, heads):                      # only the injected head's slice of columns moved
        moved = torch.nonzero((model.state_dict()[name] != before[name]).any(0)).flatten().tolist()
        assert moved == list(range(8 * k, 8 * k + 8)), name
    out = neuron_scores(model, x, 5, 3, units="heads", methods="zero_out,activations")
    for method, scores in out["scores"].items():
        assert scores.shape == (1, 2, 4) and recall_at_k(scores[0], heads).tolist() == [1.0, 1.0], method
    # the benchmark itself on heads: the config says so, Zero-Out recalls every injected head
    fresh, data = TinyGPT(14, n_layer=2, n_head=4, d_model=32, d_mlp=32, max_len=16, seed=2).eval(), \
        trained_to_memorise(4)[1]
    res = memloc.inj_benchmark(fresh, data, n_sequences=2, n_injected=1, methods="zero_out,random", lr=0.1,
                               max_steps=300, units="heads", ref_batch_size=0, device="cpu")
    assert res.config["units"] == "heads" and res.config["n_head"] == 4 and "d_mlp" not in res.config
    assert res["injected"].shape == (2, 2, 1) and res["injected"].values.max() < 4
    done = res["injected_ok"].values
    assert done.all() and (res["recall"].sel({"method": "zero_out"}).values == 1).all()
    text = plot_inj(res, tmp_path)
    assert "injected heads" in text and "neurons" not in text


def test_del_on_heads_zeroes_exactly_the_top_heads(tmp_path):
    model, data = trained_to_memorise(4)
    res = memloc.del_benchmark(model, data, units="heads", fractions=[0.5, 1.0], methods="zero_out,random",
                               ref_batch_size=0, device="cpu")
    assert res.config["units"] == "heads" and res.config["n_head"] == 2 and res["zeroed"].values.tolist() == [1, 2]
    scores = neuron_scores(model, data.tokens[:4], 5, 5, units="heads", methods="zero_out,random",
                           ids=np.arange(4))["scores"]
    for a, method in enumerate(("zero_out", "random")):
        for b, k in enumerate((1, 2)):
            for i in range(4):
                cut = zero_heads(model, top_heads(scores[method][i], k))
                mine = sequence_measures(cut, data.tokens[i:i + 1], 5, 5)
                others = sequence_measures(cut, data.tokens[[j for j in range(4) if j != i]], 5, 5)
                test = sequence_measures(cut, data.test_tokens, 5, 5)
                at = {"method": a, "fraction": b, "target": i}
                assert float(res["loss"][at]) == pytest.approx(float(mine["suffix_loss"][0]), rel=1e-5)
                assert bool(res["memorised"][at]) == bool(mine["memorised"][0])
                assert float(res["kept"][at]) == pytest.approx(others["memorised"].mean())
                assert float(res["test_loss"][at]) == pytest.approx(float(test["suffix_loss"].mean()), rel=1e-5)
    assert not res["memorised"].values[:, 1].any()              # every head zeroed: nothing is reproduced
    assert "heads zeroed per layer" in plot_del(res, tmp_path)


def test_mitigate_on_heads_zeroes_the_heads_it_counts():
    model, data = trained_to_memorise(8)
    res = memloc.mitigate(model, data, units="heads", methods="zero_out,greedy", fractions=0.5, ref_batch_size=0,
                          device="cpu")
    assert res.config["units"] == "heads" and res["setting"].values.tolist() == ["zero_out@0.5", "greedy@0.5"]
    assert res["changed"].values.tolist()[0] == 2                  # one head of each of the 2 layers
    scores = neuron_scores(model, data.tokens[:4], 5, 5, units="heads", methods="zero_out")["scores"]["zero_out"]
    cut = zero_heads(model, top_heads(scores.mean(0), 1))
    after = sequence_measures(cut, data.tokens, 5, 5)["memorised"]
    assert res["memorised"].values[0].tolist() == after[:4].tolist()
    assert float(res["others_memorised"].values[0]) == pytest.approx(after[4:].mean())
    # greedy on heads: the heads it counts are the ones whose columns it zeroed, nothing else changed
    t = Task(copy.deepcopy(model), data.tokens[:4], torch.ones(4, dtype=torch.bool), data.tokens[4:], data.tokens[4:],
             5, 5, units="heads")
    n = FUNCTIONS["greedy"](t, mitigation_options(None)["greedy"], 1.0)
    moved = [name for (name, a), b in zip(t.model.named_parameters(), model.parameters()) if not torch.equal(a, b)]
    dead = [int((t.model.get_submodule(h.name).weight.view(-1, h.size, h.group) == 0).all(0).all(1).sum())
            for h in attention_heads(model)]
    assert 1 <= n == sum(dead) and set(moved) <= {"blocks.0.attn.proj.weight", "blocks.1.attn.proj.weight"}
    assert not sequence_measures(t.model, data.tokens[:4], 5, 5)["memorised"].any()     # it stopped once none was
    assert memloc.mitigate(model, data, units="heads", fractions=0.5, ref_batch_size=0, device="cpu",
                           options={"slimming": {"max_steps": 20}, "hard_concrete": {"max_steps": 20}}
                           ).config["methods"] == ["hard_concrete", "slimming", "zero_out", "ig", "activations",
                                                   "grad_x_act", "greedy", "random"]     # the default: unit methods


def test_units_errors(memorising_lm, capsys):
    model, data = trained_to_memorise(4)
    no_heads = torch.nn.Sequential(torch.nn.Embedding(14, 8), torch.nn.Linear(8, 14))
    for call, match in (
            (lambda: memloc.inj_benchmark(model, data, units="both"), "ranks one kind of unit at a time"),
            (lambda: memloc.inj_benchmark(model, data, units="neurons"), "unknown units 'neurons'"),
            (lambda: memloc.inj_benchmark(model, data, units="heads", n_injected=2, device="cpu"),
             "n_injected 2 is all the 2 heads of a layer"),
            (lambda: memloc.del_benchmark(model, data, units=1), "unknown units 1"),
            (lambda: memloc.del_benchmark(no_heads, data, units="heads", device="cpu"), "no attention output projection"),
            (lambda: memloc.mitigate(model, data, units="heads", methods="zero_out,balanced_subnet", device="cpu"),
             "methods balanced_subnet with units='heads'.*prune MLP weights"),
            (lambda: memloc.mitigate(no_heads, data, units="heads", methods="random", device="cpu"),
             "no attention output projection")):
        with pytest.raises(MemlocError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        cli_run("mitigate", [str(memorising_lm.path), "--units", "heads", "--methods", "fine_tune", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "fine_tune trains every weight" in err, err


def test_the_findings_say_heads_where_localisation_ranked_heads():
    from memloc.reporting.summary import _language_model
    model, data = trained_to_memorise(4)
    for units, words in (("heads", "zeroed attention heads"), ("mlp", "zeroed MLP neurons")):
        res = memloc.localise_neurons(model, data, units=units, methods="greedy", ref_batch_size=0, device="cpu")
        assert words in _language_model({"localise_neurons": res})[0], units
