"""The layer analyses (gradients, rewind, retrain) on language-model runs (issue 23, item 5): the
memorisation targets in the role of the noisy examples, the suffix loss per sequence, exact
memorisation for "still memorised"."""
from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch

import memloc
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.lm import lm_logits, suffix_measures
from memloc.core.schemas import LM_SUBSETS
from memloc.core.selection import merged_layer, select_layers
from memloc.core.units import trace

from conftest import results_free_copy

G = importlib.import_module("memloc.analyses.gradients")
RT = importlib.import_module("memloc.analyses.retrain")
R = importlib.import_module("memloc.analyses.rewind")

pytestmark = pytest.mark.usefixtures("one_thread")
TINYGPT_BLOCK = ("ln1", "attn.qkv", "attn.proj", "ln2", "mlp.up", "mlp.down")


def structure(run, data):
    return trace(run.model(), data.tokens[:2])


def test_layers_of_tinygpt_are_embeddings_norms_and_projections(memorising_lm):
    layers = structure(memorising_lm, memorising_lm.data()).layers
    names = [l.name for l in layers]
    assert names == (["tok", "pos"] + [f"blocks.{i}.{m}" for i in range(2) for m in TINYGPT_BLOCK]
                     + ["ln_f", "head"])
    model = memorising_lm.model()
    keys = [k for l in layers for k in l.params]
    assert sorted(keys) == sorted(k for k, _ in model.named_parameters())      # each parameter in one layer


def test_a_tied_head_is_part_of_its_embedding():
    from memloc.core.lm import TinyGPT
    model = TinyGPT(14, n_layer=1, d_model=8, n_head=2, max_len=16, seed=0)
    model.head.weight = model.tok.weight                  # tied, as GPT-2's lm_head and wte
    layers = trace(model, torch.zeros(2, 8, dtype=torch.long)).layers
    assert [l.name for l in layers] == ["tok", "pos", *(f"blocks.0.{m}" for m in TINYGPT_BLOCK), "ln_f"]
    assert sorted(k for l in layers for k in l.params) == sorted(k for k, _ in model.named_parameters())


def reference(model, data, layers):
    """Float64, one full batch, straight from the definition: the gradients of the mean suffix loss of
    the clean and of the target sequences, per layer."""
    m = copy.deepcopy(model).double()
    p, s = data.prefix_len, data.suffix_len
    x = data.tokens
    target = torch.as_tensor(data.is_memorised_target)
    params = dict(m.named_parameters())
    out = {}
    for part, mask in (("clean", ~target), ("noisy", target)):
        loss = suffix_measures(lm_logits(m, x[:, :p + s - 1]), x, p, s)[0][mask].mean()
        g = torch.autograd.grad(loss, [params[k] for l in layers for k in l.params])
        flat, i = [], 0
        for l in layers:
            flat.append(torch.cat([t.flatten() for t in g[i:i + len(l.params)]]))
            i += len(l.params)
        out[part] = flat
    root = np.sqrt([l.numel for l in layers])
    return ({part: np.array([float(g.norm()) for g in out[part]]) / root for part in out},
            np.array([float(a @ b / (a.norm() * b.norm())) for a, b in zip(out["clean"], out["noisy"])]))


def test_gradients_are_the_suffix_loss_gradients_of_targets_and_clean(memorising_lm):
    run, data = memorising_lm, memorising_lm.data()
    res = memloc.gradients(run, checkpoints="1,final", device="cpu", eval_batch_size=20)   # 3 batches
    assert list(res["subset"].values) == ["clean", "noisy", "all"]
    assert res.config["loss"] == "suffix cross_entropy mean" and res.config["precision"] == "fp32"
    layers = structure(run, data).layers
    for row, epoch in enumerate((1, run.final_epoch)):
        norms, cosine = reference(run.model(epoch), data, layers)
        for part in ("clean", "noisy"):
            np.testing.assert_allclose(res["norm"].sel(subset=part).values[row], norms[part], rtol=2e-4, atol=1e-8)
        np.testing.assert_allclose(res["cosine"].values[row], cosine, rtol=2e-4, atol=1e-6)
    # bf16 autocast: the same accounting to bf16's precision, recorded
    low = memloc.gradients(run, checkpoints="final", device="cpu", precision="bf16")
    assert low.config["precision"] == "bf16"
    np.testing.assert_allclose(low["norm"].values, res["norm"].values[-1:], rtol=0.1, atol=1e-6)


def test_rewinding_everything_gives_the_earlier_models_memorisation(memorising_lm):
    run, data = memorising_lm, memorising_lm.data()
    everything = merged_layer(structure(run, data).layers)
    acc, base = R.rewind_layers(run.model(), [run.checkpoint(0), run.checkpoint()], [everything], data)
    target = data.is_memorised_target
    for row, epoch in ((0, 0), (1, run.final_epoch)):
        train = memloc.memorisation(run.model(epoch), data, device="cpu")
        test = memloc.memorisation(run.model(epoch), data, split="test", device="cpu")
        want = {"clean": train["memorised"].values[~target].mean(), "noisy": train["memorised"].values[target].mean(),
                "clean_tokens": train["suffix_accuracy"].values[~target].mean(),
                "test_tokens": test["suffix_accuracy"].values.mean(), "test": test["memorised"].values.mean()}
        assert list(acc[row, 0]) == [want[s] for s in LM_SUBSETS], epoch
    assert np.array_equal(acc[1, 0], base)
    noisy = LM_SUBSETS.index("noisy")
    assert base[noisy] >= 0.25 and acc[0, 0, noisy] == 0       # memorised at the end, not at initialisation
    res = memloc.rewind(run, checkpoints="0,final", layers="blocks.1.mlp.up,head", device="cpu")
    assert list(res["subset"].values) == list(LM_SUBSETS)
    assert np.array_equal(res["accuracy"].values[-1], np.broadcast_to(base, (2, len(LM_SUBSETS))))


def test_retraining_a_layer_changes_only_it(memorising_lm):
    run, data = memorising_lm, memorising_lm.data()
    model, final, init = run.model(), run.checkpoint(), run.checkpoint(0)
    layer = select_layers(structure(run, data), "blocks.1.mlp.up")[0]
    curve, new = RT.retrain_layer(model, init, layer, data, epochs=2, batch_size=8, lr=0.01)
    assert curve.shape == (3, len(LM_SUBSETS))
    state = new.state_dict()
    for k in final:
        if k in layer.keys:
            assert not torch.equal(state[k], init[k]) and not torch.equal(state[k], final[k]), k
        else:
            assert torch.equal(state[k], final[k]), k                # every other tensor, bit for bit
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in final.items())   # the caller's model untouched
    # row 0 is the model right after the reset: rewinding the layer to epoch 0
    assert np.array_equal(curve[0], R.rewind_layers(model, [init], [layer], data)[0][0, 0])


def test_commands_on_a_language_model_run(memorising_lm, tmp_path):
    run = results_free_copy(memorising_lm, tmp_path / "run")
    base = [str(run.path), "--device", "cpu"]
    g = cli_run("gradients", [*base, "--checkpoints", "final", "--layers", "tok,blocks.0.mlp.down"])
    assert g["norm"].shape == (1, 2, 3) and np.isfinite(g["norm"].values).all()
    r = cli_run("rewind", [*base, "--checkpoints", "0", "--layers", "blocks.0.attn.qkv"])
    t = cli_run("retrain", [*base, "--epochs", "1", "--layers", "blocks.1.mlp.down", "--optimizer", "adam",
                            "--lr", "0.003"])
    for name, res in (("gradients", g), ("rewind", r), ("retrain", t)):
        saved = run.result(name)
        assert saved.attrs["memloc_schema"] == f"memloc.{name}"
        for var in res.data_vars:
            np.testing.assert_array_equal(saved[var].values, res[var].values)
    assert list(run.result("retrain")["subset"].values) == list(LM_SUBSETS)
    assert run.result("retrain").config["optimizer"] == "adam"
    with pytest.raises(MemlocError, match="unknown optimizer 'lbfgs'"):
        memloc.retrain(run, optimizer="lbfgs", device="cpu")


@pytest.mark.slow      # importing transformers takes 5-15 s on 2 busy cores
def test_hf_gpt2_layers_and_gradients():
    from memloc.core.lm import hf_causal_lm
    from memloc.core.sequences import tinymem
    data = tinymem("mult", n_train=12, n_test=4, seq_len=16, suffix_len=4, noise=0.25)
    model = hf_causal_lm("gpt2", data.vocab_size, n_layer=2, d_model=16, n_head=2)
    layers = trace(model, data.tokens[:2]).layers
    block = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    assert [l.name for l in layers] == (["transformer.wte", "transformer.wpe"]
                                        + [f"transformer.h.{i}.{m}" for i in range(2) for m in block]
                                        + ["transformer.ln_f"])     # the head is tied to wte: one layer
    assert {l.kind for l in layers if ".c_" in l.name} == {"linear"}
    assert sorted(k for l in layers for k in l.params) == sorted(k for k, _ in model.named_parameters())
    res = memloc.gradients(model, data, device="cpu")
    assert np.isfinite(res["norm"].values).all() and np.isfinite(res["cosine"].values).all()
    norms, cosine = reference(model, data, layers)
    np.testing.assert_allclose(res["cosine"].values[0], cosine, rtol=2e-4, atol=1e-6)


def test_retraining_with_a_single_optimiser_step_trains(memorising_lm):
    """The clean sequences fit one batch: one epoch is one step, which the one-cycle schedule used to take
    at its ramp's start, learning rate 0, leaving the layer at its reset value (``memloc retrain --epochs
    1`` printed rewind's epoch-0 table). The only step is taken at the peak."""
    run, data = memorising_lm, memorising_lm.data()
    assert (~np.asarray(data.is_memorised_target)).sum() <= RT.HYPER["batch_size"]     # one step
    init = run.checkpoint(0)
    layer = select_layers(structure(run, data), "blocks.1.mlp.up")[0]
    new = RT.retrain_layer(run.model(), init, layer, data, epochs=1, lr=0.01)[1].state_dict()
    assert all(not torch.equal(new[k], init[k]) for k in layer.keys)
