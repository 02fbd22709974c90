"""Neuron localisation in language models (issue 24): known answers, exactness and error paths."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import memloc
from memloc.analyses.inj import inject_sequence, recall_at_k
from memloc.analyses.localise import METHODS, neuron_scores
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.lm import TinyGPT, lm_logits, suffix_measures
from memloc.core.optim import make_optimizer
from memloc.core.neurons import mlp_layers, neuron_hooks, neuron_masks, output_weights
from memloc.core.sequences import SequenceSet, TINYMEM_VOCAB
from conftest import forward_dtypes
from memloc.training.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

#: learned masks with larger steps (they stop on their penalty sooner) and at most 300 of them. Hard Concrete's L0
#: penalty is a mean over the model's neurons: MemPi's lambda 1000 (set for GPT-2's 36,864) weighs each of these 64
#: masks 576x more, Adam then lowers every log-alpha in step, and the stop (expected L0 share < 0.4) comes after
#: about 40 steps with every score within 0.002 of 0.184, so the noise draw (the seed) picked the top neuron; at
#: MemPi's weight per mask (1000 x 64 / 36,864) the injected neurons lead by 0.2-0.46 for every seed tried (0-4).
FAST = {"slimming": {"lr": 2e-2, "max_steps": 300},
        "hard_concrete": {"lr": 3e-2, "max_steps": 300, "lambda_l0": 1000.0 * 64 / 36864}}


def tiny_gpt(seed=0):
    return TinyGPT(14, n_layer=2, n_head=2, d_model=32, d_mlp=32, max_len=16, seed=seed).eval()


@pytest.fixture(scope="module")
def injected():
    """A random TinyGPT with one random neuron per layer fine-tuned (its output weights only) until it
    reproduces a random 3-token suffix from a 5-token prefix: the known answer."""
    model = tiny_gpt(2)
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.integers(0, 14, (1, 8)))
    neurons = np.stack([rng.choice(32, 1, replace=False) for _ in range(2)])
    assert not bool(suffix_measures(lm_logits(model, x[:, :-1]), x, 5, 3)[2])     # new to the model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps, ok = inject_sequence(model, x, 5, 3, neurons, lr=0.3, max_steps=300)
    assert ok and steps > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["blocks.0.mlp.down.weight", "blocks.1.mlp.down.weight"]
    for layer, j in zip((0, 1), neurons[:, 0]):           # only the injected neurons' columns moved
        diff = (model.state_dict()[changed[layer]] != before[changed[layer]]).any(0)
        assert torch.nonzero(diff).flatten().tolist() == [j]
    return model, x, neurons


@pytest.fixture(scope="module")
def memorising():
    """A TinyGPT trained (all weights, full batch) until it reproduces 4 random sequences' suffixes."""
    model = tiny_gpt(0).train()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 14, (4, 10)))
    opt = make_optimizer(model.parameters(), "adam", lr=1e-2, weight_decay=0.0)
    for _ in range(300):
        loss, _, memorised = suffix_measures(lm_logits(model, x[:, :-1]), x, 5, 5)
        if memorised.all():
            break
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    assert memorised.all()
    return model.eval(), x


def test_every_method_ranks_the_injected_neuron_of_each_layer_first(injected):
    model, x, neurons = injected
    out = neuron_scores(model, x, 5, 3, options=FAST)
    assert list(out["scores"]) == list(METHODS) and out["layers"] == ["blocks.0.mlp.down", "blocks.1.mlp.down"]
    for method, scores in out["scores"].items():
        assert scores.shape == (1, 2, 32) and scores.dtype == np.float64
        expected = 0.0 if method == "random" else 1.0
        assert recall_at_k(scores[0], neurons).tolist() == [expected] * 2 or method == "random", method
    assert out["greedy_broken"].tolist() == [True] and out["greedy_zeroed"][0] >= 1
    assert set(out["seconds"]) == set(METHODS)


def test_bf16_methods_still_find_the_injected_neurons_and_bf16_injects(injected):
    """Under bf16 autocast every method ranks the injected neuron of each layer first with scores close to
    fp32's, and an injection run in bf16 memorises a new sequence."""
    model, x, neurons = injected
    methods = "zero_out,activations,grad_x_act,greedy"
    a = neuron_scores(model, x, 5, 3, methods=methods)
    with forward_dtypes() as seen:
        b = neuron_scores(model, x, 5, 3, methods=methods, precision="bf16")
    assert torch.bfloat16 in seen
    for method, want in a["scores"].items():
        got = b["scores"][method]
        assert recall_at_k(got[0], neurons).tolist() == [1.0, 1.0], method
        share = 0.4 if method == "grad_x_act" else 0.05     # the gradient of a small loss: bf16 moves it most
        np.testing.assert_allclose(got, want, atol=share * np.abs(want).max(), err_msg=method)
    assert not np.array_equal(b["scores"]["zero_out"], a["scores"]["zero_out"])
    fresh, y = tiny_gpt(3), torch.from_numpy(np.random.default_rng(3).integers(0, 14, (1, 8)))
    assert not bool(suffix_measures(lm_logits(fresh, y[:, :-1]), y, 5, 3)[2])
    with forward_dtypes() as seen:
        steps, ok = inject_sequence(fresh, y, 5, 3, neurons, lr=0.3, max_steps=300, precision="bf16")
    assert ok and steps > 0 and torch.bfloat16 in seen


def test_masks_are_zeroed_output_weights_and_zero_out_is_their_loss_increase(injected):
    model, x, _ = injected
    layers = mlp_layers(model)
    with torch.no_grad():
        base = suffix_measures(lm_logits(model, x[:, :-1]), x, 5, 3)[0]
    zero = neuron_scores(model, x, 5, 3, methods="zero_out", eval_batch_size=7)["scores"]["zero_out"][0]
    for layer, j in ((0, 3), (1, 17)):
        masks = torch.ones(1, 2, 32)
        masks[0, layer, j] = 0
        with torch.no_grad(), neuron_masks(model, layers, masks):
            masked = lm_logits(model, x[:, :-1])
        copy = tiny_gpt()
        copy.load_state_dict(model.state_dict())
        weight, dim = output_weights(copy, layers[layer])
        with torch.no_grad():
            weight.select(dim, j).zero_()
            zeroed = lm_logits(copy, x[:, :-1])
        torch.testing.assert_close(masked, zeroed, rtol=1e-5, atol=1e-6)
        loss = suffix_measures(masked, x, 5, 3)[0]
        assert zero[layer, j] == pytest.approx(float(loss - base), abs=1e-6)


def test_activations_is_mempi_mean_activation_times_output_norm(injected):
    model, x, _ = injected
    layers = mlp_layers(model)
    acts = {}
    with torch.no_grad(), neuron_hooks(model, layers, lambda i, h: acts.__setitem__(i, h)):
        lm_logits(model, x[:, :-1])
    got = neuron_scores(model, x, 5, 3, methods="activations")["scores"]["activations"][0]
    for i, layer in enumerate(layers):
        w = model.get_submodule(layer.name).weight.detach().double()        # (d_model, d_mlp)
        want = acts[i][0, 4:7].double().mean(0).abs() * w.norm(dim=0)
        np.testing.assert_allclose(got[i], want.numpy(), rtol=1e-6)


def test_ig_equals_a_slow_gauss_legendre_reference_and_is_complete(memorising):
    x = memorising[1]
    model = tiny_gpt()
    model.load_state_dict(memorising[0].state_dict())
    model.double()
    x = x[:1]
    layers = mlp_layers(model)
    n = 8
    got = neuron_scores(model, x, 5, 5, methods="ig", options={"ig": {"n_steps": n}}, eval_batch_size=3)
    got = got["scores"]["ig"][0]
    nodes, weights = np.polynomial.legendre.leggauss(n)
    acts = {}
    with torch.no_grad(), neuron_hooks(model, layers, lambda i, h: acts.__setitem__(i, h)):
        lm_logits(model, x[:, :-1])

    def minus_loss(layer, h):
        with neuron_hooks(model, layers, lambda i, cur: h if i == layer else None):
            return -suffix_measures(lm_logits(model, x[:, :-1]), x, 5, 5)[0].sum()

    for layer in range(2):
        total = torch.zeros_like(acts[layer])
        for node, weight in zip(nodes, weights):                  # one point at a time
            h = (acts[layer] * (node + 1) / 2).requires_grad_(True)
            step = float(np.float32(weight / 2))                  # captum rounds its step sizes to float32
            total += step * torch.autograd.grad(minus_loss(layer, h), h)[0]
        want = (acts[layer] * total)[0].sum(0)
        np.testing.assert_allclose(got[layer], want.numpy(), rtol=1e-9, atol=1e-12)
    fine = neuron_scores(model, x, 5, 5, methods="ig", options={"ig": {"n_steps": 64}})["scores"]["ig"][0]
    with torch.no_grad():
        for layer in range(2):     # completeness: the attributions add up to F(h) - F(0)
            diff = minus_loss(layer, acts[layer]) - minus_loss(layer, torch.zeros_like(acts[layer]))
            assert fine[layer].sum() == pytest.approx(float(diff), rel=1e-4)


def test_greedy_batched_equals_one_at_a_time_in_float64(memorising):
    model = tiny_gpt()
    model.load_state_dict(memorising[0].state_dict())
    model.double()
    x = memorising[1]
    batched = neuron_scores(model, x, 5, 5, methods="greedy,grad_x_act", eval_batch_size=4)
    single = [neuron_scores(model, x[i:i + 1], 5, 5, methods="greedy,grad_x_act", eval_batch_size=1)
              for i in range(len(x))]
    zeroed = batched["greedy_zeroed"]
    assert zeroed.tolist() == [int(s["greedy_zeroed"][0]) for s in single] and (zeroed >= 1).all()
    assert batched["greedy_broken"].all() and len(set(zeroed.tolist())) > 1       # searches of different lengths
    for i, s in enumerate(single):
        for method in ("greedy", "grad_x_act"):
            a, b = batched["scores"][method][i], s["scores"][method][0]
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
        order = np.argsort(-batched["scores"]["greedy"][i].ravel(), kind="stable")[:zeroed[i]]
        assert np.array_equal(order, np.argsort(-s["scores"]["greedy"][0].ravel(), kind="stable")[:zeroed[i]])
    # carried on past the break: the same first neurons and break counts, batched still equal to one at a time;
    # and with reference sequences whose loss it keeps low (each target evaluates them under its own masks)
    more = {"greedy": {"min_zeroed": 5}}
    longer = neuron_scores(model, x, 5, 5, methods="greedy", options=more, eval_batch_size=4)
    assert longer["greedy_zeroed"].tolist() == zeroed.tolist()
    reference = torch.from_numpy(np.random.default_rng(1).integers(0, 14, (3, 12)))
    kept = neuron_scores(model, x, 5, 5, methods="greedy", reference=reference, options=more, eval_batch_size=4)
    assert not np.array_equal(kept["scores"]["greedy"], longer["scores"]["greedy"])
    for i in range(len(x)):
        a = np.argsort(-longer["scores"]["greedy"][i].ravel(), kind="stable")
        b = np.argsort(-batched["scores"]["greedy"][i].ravel(), kind="stable")
        assert np.array_equal(a[:zeroed[i]], b[:zeroed[i]])
        for ref, want in ((None, longer), (reference, kept))[i % 2:][:1]:      # each kind on two targets
            one = neuron_scores(model, x[i:i + 1], 5, 5, methods="greedy", reference=ref, options=more,
                                eval_batch_size=1)
            np.testing.assert_allclose(one["scores"]["greedy"][0], want["scores"]["greedy"][i], rtol=1e-10,
                                       atol=1e-14)
            assert one["greedy_zeroed"][0] == want["greedy_zeroed"][i]
    # the default carries on to top_k x layers zeroed (top_k None: 1% of 32 neurons -> 1, so 2); min_zeroed 0 stops
    # at the break, which leaves a target broken by one neuron ranked by the gradient after it
    runs = ((more_of(2), None), (more_of(0), None), (more_of(6), None), (None, 3))
    two, stop, six, top3 = (neuron_scores(model, x, 5, 5, methods="greedy", options=o, eval_batch_size=4, top_k=k)
                            ["scores"]["greedy"] for o, k in runs)
    np.testing.assert_array_equal(batched["scores"]["greedy"], two)
    np.testing.assert_array_equal(top3, six)
    for i in range(len(x)):
        assert np.array_equal(stop[i], two[i]) == (zeroed[i] >= 2)
    # zeroing greedy's neurons really breaks each suffix (and one fewer does not)
    layers = mlp_layers(model)
    for i in range(len(x)):
        order = np.argsort(-batched["scores"]["greedy"][i].ravel(), kind="stable")
        for count, broken in ((zeroed[i], True), (zeroed[i] - 1, False)):
            masks = torch.ones(1, 2 * 32, dtype=torch.float64)
            masks[0, torch.as_tensor(order[:count])] = 0
            with torch.no_grad(), neuron_masks(model, layers, masks.view(1, 2, 32)):
                memorised = suffix_measures(lm_logits(model, x[i:i + 1, :-1]), x[i:i + 1], 5, 5)[2]
            assert bool(memorised) != broken


def more_of(count: int) -> dict:
    return {"greedy": {"min_zeroed": count}}


def test_localise_neurons_result_and_errors(memorising, tmp_path):
    model, x = memorising
    data = SequenceSet("random", x, x[:0], np.arange(4), np.ones(4, bool), np.full(4, "canary"), 5, 5,
                       list(TINYMEM_VOCAB))
    res = memloc.localise_neurons(model, data, methods="greedy,random", device="cpu")
    assert res["score"].dims == ("method", "target", "layer", "neuron") and res["score"].shape == (2, 4, 2, 32)
    assert res["target"].values.tolist() == [0, 1, 2, 3] and res["memorised"].values.all()
    assert (res["greedy_zeroed"].values >= 1).all() and res.config["options"]["greedy"]["max_zeroed"] == 64
    assert res.config["options"]["greedy"]["min_zeroed"] == 2        # "auto" as run: 1% of 32 neurons x 2 layers
    assert not model.training and next(model.parameters()).dtype == torch.float32     # the caller's model untouched
    one = memloc.localise_neurons(model, data, examples=[2], methods="grad_x_act", device="cpu")
    np.testing.assert_allclose(one["score"].values[0, 0], neuron_scores(model, x[2:3], 5, 5, methods="grad_x_act")
                               ["scores"]["grad_x_act"][0])
    for kwargs, match in (({"methods": "greedy,nope"}, r"methods names no localisation method \('nope'\)"),
                          ({"options": {"slimming": {"rate": 1}}}, "options for slimming has no 'rate'"),
                          ({"examples": [9]}, "examples holds 9, which is no sequence id"),
                          ({"examples": "memorised:x"}, "memorised:N"),
                          ({"options": more_of(-1)}, "greedy's min_zeroed -1: give auto")):
        with pytest.raises(MemlocError, match=match) as e:
            memloc.localise_neurons(model, data, device="cpu", **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(MemlocError, match="runs past the end of sequences of 10 tokens"):
        neuron_scores(model, x, 7, 5)
    with pytest.raises(MemlocError, match="reference sequences have 6 tokens, fewer than"):
        neuron_scores(model, x, 5, 5, reference=x[:, :6])
    memloc.Recorder(tmp_path / "img", torch.nn.Linear(4, 3), eval_train=(torch.randn(20, 4), torch.randint(0, 3, (20,))))
    with pytest.raises(MemlocError, match="not a language-model run"):
        memloc.localise_neurons(tmp_path / "img", device="cpu")
    with pytest.raises(MemlocError, match="no MLP down-projection"):
        memloc.localise_neurons(torch.nn.Sequential(torch.nn.Embedding(14, 8), torch.nn.Linear(8, 14)), data,
                                device="cpu")
    with pytest.raises(MemlocError, match="reproduces none of its memorisation targets.*examples='0,1,2'"):
        memloc.localise_neurons(tiny_gpt(5), data, device="cpu")
    with pytest.raises(MemlocError, match="data must be a SequenceSet"):
        memloc.localise_neurons(model, x, device="cpu")


def test_targets_keep_their_random_streams_and_batches_resume(memorising, tmp_path, monkeypatch):
    """A target's random baseline is drawn from its id: the same in any batch, as any subset (what lets
    torchrun split the targets); with ``resume`` each batch of targets is a part that a rerun takes back."""
    model, x = memorising
    data = SequenceSet("random", x, x[:0], np.arange(4), np.ones(4, bool), np.full(4, "canary"), 5, 5,
                       list(TINYMEM_VOCAB))
    kw = {"methods": "grad_x_act,random", "device": "cpu"}
    whole = memloc.localise_neurons(model, data, eval_batch_size=4, **kw)
    pair = memloc.localise_neurons(model, data, examples=[3, 1], eval_batch_size=1, **kw)
    assert np.array_equal(pair["score"].values[1], whole["score"].values[1][[3, 1]])
    assert not np.array_equal(whole["score"].values[1, 0], whole["score"].values[1, 1])     # one stream per target
    parts = tmp_path / "parts"
    first = memloc.localise_neurons(model, data, eval_batch_size=1, resume=parts, **kw)
    saved = sorted(parts.glob("part_*.npz"))
    assert len(saved) == 4 and np.array_equal(first["score"].values[1], whole["score"].values[1])
    for part in saved[1:3]:
        part.unlink()
    localised = []
    module = sys.modules["memloc.analyses.localise"]
    monkeypatch.setattr(module, "neuron_scores", lambda m, tokens, *a, f=module.neuron_scores, **k:
                        localised.append(len(tokens)) or f(m, tokens, *a, **k))
    again = memloc.localise_neurons(model, data, eval_batch_size=1, resume=parts, **kw)
    assert localised == [1, 1] and np.array_equal(again["score"].values, first["score"].values)
    with pytest.raises(MemlocError, match="different settings"):
        memloc.localise_neurons(model, data, eval_batch_size=1, resume=parts, seed=1, **kw)


def test_command_on_a_run_and_inj_on_it(tmp_path, capsys):
    cfg = {"dataset": "tinymem:increment", "model": "gpt", "n_layer": 2, "d_model": 32, "n_head": 2, "n_train": 16,
           "n_test": 4, "seq_len": 12, "epochs": 1, "batch_size": 8, "lr": 3e-3}
    run = train(tmp_path / "lm", cfg, device="cpu")
    cli_run("localise-neurons", [str(run.path), "--examples", "0,3", "--methods", "zero_out,greedy,random",
                                 "--set", "greedy.min_zeroed=3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "greedy" in out and "wrote" in out
    res = run.result("localise_neurons")
    assert res["target"].values.tolist() == [0, 3] and res.sizes["neuron"] == 128
    assert res.config["options"]["greedy"]["min_zeroed"] == 3 and len(res.config["reference"]) == 8
    assert not set(res.config["reference"]) & {0, 3} and not run.is_noisy[res.config["reference"]].any()
    for argv, flag in ((["--methods", "nope"], "--methods"), (["--set", "slimming.rate=1"], "--set for slimming"),
                       (["--set", "greedy"], "--set 'greedy'")):
        with pytest.raises(SystemExit) as e:
            cli_run("localise-neurons", [str(run.path), *argv, "--overwrite", "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and len(err.strip().splitlines()) == 1, err
    inj = memloc.inj_benchmark(run, n_sequences=2, n_injected=2, methods="zero_out,grad_x_act,random", lr=0.1,
                               max_steps=200, device="cpu")
    assert inj["recall"].dims == ("method", "sequence", "layer") and inj["injected"].shape == (2, 2, 2)
    done = inj["injected_ok"].values
    assert done.any() and np.isnan(inj["recall"].values[:, ~done]).all()
    assert (inj["recall"].sel({"method": "zero_out"}).values[done] >= 0.5).all()


@pytest.mark.slow      # importing transformers takes 5-15 s on 2 busy cores
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_transformers_neurons_are_the_down_projection_inputs(family):
    model = memloc.hf_causal_lm(family, 14, n_layer=2, n_head=2, d_model=16, max_len=16, seed=0)
    layers = mlp_layers(model)
    assert len(layers) == 2 and all(layer.size == 64 for layer in layers)
    x = torch.randint(0, 14, (2, 8), generator=torch.Generator().manual_seed(0))
    masks = torch.ones(2, 2, 64)
    masks[:, 1, 5] = 0
    with torch.no_grad(), neuron_masks(model, layers, masks):
        masked = lm_logits(model, x)
    weight, dim = output_weights(model, layers[1])
    with torch.no_grad():
        weight.select(dim, 5).zero_()
        torch.testing.assert_close(masked, lm_logits(model, x), rtol=1e-5, atol=1e-6)
    out = neuron_scores(model, x, 4, 4, options=FAST, methods=METHODS if family == "gpt2" else "zero_out,greedy")
    assert all(s.shape == (2, 2, 64) and np.isfinite(s).all() for s in out["scores"].values())
