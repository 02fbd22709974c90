"""DEL (issue 24 item 3): zeroing each method's top neurons of naturally memorised sequences, checked
against an independent recomputation with sequence_measures, and its error paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import memloc
from memloc.analyses.deletion import check_fractions, zeroing_masks
from memloc.core.errors import MemlocError
from memloc.core.lm import TinyGPT, sequence_measures
from memloc.core.neurons import mlp_layers, neuron_masks
from conftest import in_fp32_and_bf16, trained_to_memorise

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(seed=0):
    return TinyGPT(14, n_layer=2, n_head=2, d_model=32, d_mlp=32, max_len=16, seed=seed).eval()


@pytest.fixture(scope="module")
def memorising():
    """A TinyGPT that reproduces its 4 target sequences' suffixes (trained until then), beside 4 clean training
    sequences and 6 test sequences (:func:`conftest.trained_to_memorise`)."""
    return trained_to_memorise(4)


def test_del_in_bf16_is_close_to_fp32(memorising):
    model, data = memorising
    kw = {"fractions": [0.1], "methods": "random", "device": "cpu"}
    a, b = in_fp32_and_bf16(lambda **p: memloc.del_benchmark(model, data, **kw, **p), "loss")
    for name in ("loss", "test_loss", "loss_before", "test_loss_before"):
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=0.02, atol=0.01, err_msg=name)


def test_del_reports_what_zeroing_really_does(memorising):
    model, data = memorising
    res = memloc.del_benchmark(model, data, fractions=[0.03, 0.1], methods="zero_out,grad_x_act,greedy,random",
                               device="cpu")
    assert res["memorised"].dims == ("method", "fraction", "target") and res["memorised"].shape == (4, 2, 4)
    assert res["method"].values.tolist() == ["zero_out", "grad_x_act", "greedy", "random"]
    assert res["zeroed"].values.tolist() == [1, 3] and res["target"].values.tolist() == [0, 1, 2, 3]
    assert res.config["options"]["greedy"]["min_zeroed"] == 0
    assert (res["seconds"].values >= 0).all() and res["accuracy_before"].values.tolist() == [1.0] * 4
    stop = {"greedy": {"min_zeroed": 0}}                   # DEL's greedy stops at the break
    scores = memloc.neuron_scores(model, data.tokens[:4], 5, 5, methods="zero_out,grad_x_act,greedy,random",
                                  reference=data.tokens[4:], seed=0, options=stop)["scores"]   # clean rows = reference
    layers = mlp_layers(model)
    others_rows = np.arange(4)
    for a, method in enumerate(["zero_out", "grad_x_act", "greedy", "random"]):
        for b, k in enumerate([1, 3]):
            for i in range(4):
                masks = torch.ones(2, 32)             # independent: zero the top-k of each layer by hand
                for layer in range(2):
                    top = np.argsort(-scores[method][i, layer], kind="stable")[:k]
                    masks[layer, torch.as_tensor(top)] = 0
                with neuron_masks(model, layers, masks):
                    mine = sequence_measures(model, data.tokens[i:i + 1], 5, 5)
                    others = sequence_measures(model, data.tokens[others_rows[others_rows != i]], 5, 5)
                    test = sequence_measures(model, data.test_tokens, 5, 5)
                assert bool(res["memorised"].values[a, b, i]) == bool(mine["memorised"][0])
                assert res["accuracy"].values[a, b, i] == pytest.approx(mine["suffix_accuracy"][0], abs=1e-6)
                assert res["loss"].values[a, b, i] == pytest.approx(mine["suffix_loss"][0], rel=1e-5)
                assert res["kept"].values[a, b, i] == pytest.approx(others["memorised"].mean())
                assert res["test_loss"].values[a, b, i] == pytest.approx(test["suffix_loss"].mean(), rel=1e-5)
                assert res["test_accuracy"].values[a, b, i] == pytest.approx(test["suffix_accuracy"].mean())
    # the localised neurons break targets where random ones do not
    broken = 1 - res["memorised"].values.mean(2)
    assert broken[0, 1] > broken[3, 1] and broken[0, 1] >= 0.5 and broken[2, 1] >= 0.5
    base = sequence_measures(model, data.test_tokens, 5, 5)
    assert float(res["test_loss_before"]) == pytest.approx(base["suffix_loss"].mean(), rel=1e-5)


def test_zeroing_masks_and_fractions():
    scores = np.array([[[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]]])
    assert zeroing_masks(scores, 2).tolist() == [[[1, 0, 1, 0], [0, 0, 1, 1]]]
    assert check_fractions("0.001, 0.01") == [0.001, 0.01] and check_fractions(0.5) == [0.5]
    assert check_fractions([0.1, 0.1]) == [0.1]


def test_del_errors(memorising):
    model, data = memorising
    for kwargs, match in (({"fractions": [0.0]}, r"fractions holds 0.0; each must be in \(0, 1\]"),
                          ({"fractions": "1.5"}, r"fractions holds 1.5"),
                          ({"fractions": "a"}, "fractions holds 'a', which is no number"),
                          ({"fractions": []}, "fractions is empty"),
                          ({"methods": "nope"}, "methods names no localisation method"),
                          ({"examples": [5]}, "examples holds sequence 5, which is not a memorised")):
        with pytest.raises(MemlocError, match=match) as e:
            memloc.del_benchmark(model, data, device="cpu", **{"methods": "random", **kwargs})
        assert "\n" not in str(e.value)
    with pytest.raises(MemlocError, match="reproduces none of its memorisation targets.*train it longer") as e:
        memloc.del_benchmark(tiny_gpt(5), data, methods="random", device="cpu")
    assert "\n" not in str(e.value)


def test_del_on_a_trained_run_saves_its_result(tmp_path):
    cfg = {"dataset": "tinymem:increment", "model": "gpt", "n_layer": 2, "d_model": 32, "n_head": 2, "n_train": 64,
           "n_test": 8, "seq_len": 12, "epochs": 80, "batch_size": 16, "lr": 3e-3, "noise": 0.2}
    run = memloc.train(tmp_path / "lm", cfg, device="cpu")
    res = memloc.del_benchmark(run, fractions="0.01,0.05", methods="grad_x_act,random", examples="memorised:3",
                               device="cpu", save=True)
    assert res.sizes == {"method": 2, "fraction": 2, "target": 3} and res["zeroed"].values.tolist() == [1, 6]
    assert run.is_noisy[res["target"].values].all() and len(res.config["memorised"]) >= 3
    back = run.result("del")
    np.testing.assert_array_equal(back["kept"].values, res["kept"].values)
    assert float(back["test_accuracy_before"]) == float(res["test_accuracy_before"])
