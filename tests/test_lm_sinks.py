"""Memorisation sinks in language models (MemSinks; example-tied dropout on MLP neurons, issue 23 item 5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import memloc
from memloc.cli import run as cli_run
from memloc.core.dropout import (dropout_layers, example_ids, example_masks, remove_example_tied_dropout, set_mode,
                                 sink_ids)
from memloc.core.errors import MemlocError
from memloc.core.lm import lm_logits
from memloc.core.neurons import mlp_layers, neuron_masks
from memloc.training.train import train

from conftest import train_exit2, train_interrupted

#: a tiny TinyGPT with sinks on both MLPs (about 2 CPU-s); duplicates, which must share their original's sinks
SINKS = {"dataset": "tinymem:increment", "model": "gpt", "n_layer": 2, "d_model": 32, "n_head": 2, "n_train": 96,
         "n_test": 16, "seq_len": 16, "noise": 0.25, "duplicate": 2, "epochs": 15, "batch_size": 16, "lr": 1e-2,
         "weight_decay": 0.0, "schedule": "constant", "etd_after": "mlp", "p_gen": 0.5, "p_mem": 0.25}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sinks_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("lm") / "sinks", SINKS, device="cpu")


def test_run_records_its_sinks_and_rebuilds_them(sinks_run):
    spec = sinks_run.info["model"]["etd"]
    assert spec["after"] == ["blocks.0.mlp.act", "blocks.1.mlp.act"]       # "mlp" resolved, stored as names
    assert (spec["p_gen"], spec["p_mem"], spec["seed"], spec["kind"]) == (0.5, 0.25, 0, "example_tied")
    assert sinks_run.info["model"]["etd_ids"]
    layers = dropout_layers(sinks_run.model())
    assert list(layers) == spec["after"] and len({layer.seed for layer in layers.values()}) == 2


def test_train_mode_is_the_sequence_masks_on_the_mlp_neurons(sinks_run):
    """Exact reference: the hooked model in train mode = the plain model with each sequence's keep mask
    (example_masks of its sink id, the first floor(p_gen d) neurons on) multiplied into the MLP neurons."""
    _check_against_masks(sinks_run)


@pytest.mark.slow      # importing transformers alone takes 5-15 s on 2 busy cores
def test_gpt2_config_gets_the_same_sinks(tmp_path):
    run = train(tmp_path / "gpt2", {**SINKS, "model": "hf:gpt2", "epochs": 1}, device="cpu")
    assert run.info["model"]["etd"]["after"] == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    _check_against_masks(run)
    assert memloc.evaluate_dropout(run)["accuracy"].shape == (3, 5)


def _check_against_masks(run):
    data = run.data()
    model = run.model()
    ids = sink_ids(data)
    rows = torch.arange(len(data))
    x = data.tokens[:, :-1]
    set_mode(model, "train")
    with torch.no_grad(), example_ids(model, ids[rows]):
        hooked = lm_logits(model, x)
    layers_etd = dropout_layers(model)
    remove_example_tied_dropout(model)
    layers = mlp_layers(model)
    d, n_gen = layers[0].size, int(0.5 * layers[0].size)
    masks = torch.ones(len(rows), len(layers), d)
    for i, layer in enumerate(layers_etd.values()):
        masks[:, i, n_gen:] = example_masks(ids, torch.arange(n_gen, d), p_mem=0.25, seed=layer.seed).float()
    with torch.no_grad(), neuron_masks(model, layers, masks):
        reference = lm_logits(model, x)
    assert torch.equal(hooked, reference)
    # each id's mask is fixed (a pure function of the stored spec) and duplicates share their original's
    dup = np.flatnonzero(data.copy_of >= 0)
    assert len(dup) and torch.equal(masks[dup], masks[data.copy_of[dup]])
    assert not torch.equal(masks[0], masks[1])
    assert 0.1 < float(masks[:, :, n_gen:].mean()) < 0.4          # sinks on with probability p_mem


def test_resume_keeps_every_mask(tmp_path, sinks_run):
    """Killed after epoch 1 and resumed: the same weights bit for bit, so every presentation after the
    resume saw the same sinks as the uninterrupted run."""
    cfg = {**SINKS, "epochs": 3}
    whole = train(tmp_path / "whole", cfg, device="cpu")
    train_interrupted(tmp_path / "cut", cfg, device="cpu")
    cut = train(tmp_path / "cut", cfg, device="cpu", resume=True)
    for e in whole.epochs:
        a, b = whole.checkpoint(e), cut.checkpoint(e)
        assert all(torch.equal(a[k], b[k]) for k in a), e
    assert cut.info["model"]["etd"] == whole.info["model"]["etd"] == sinks_run.info["model"]["etd"]


def test_evaluate_dropout_on_sinks(sinks_run, tmp_path, capsys):
    res = memloc.evaluate_dropout(sinks_run)
    out = cli_run("dropout", [str(sinks_run.path), "--device", "cpu", "--overwrite"])
    assert np.array_equal(out["accuracy"].values, res["accuracy"].values, equal_nan=True)
    assert "  clean_tokens  " in capsys.readouterr().out          # the summary's columns stay apart
    acc = res["accuracy"].to_pandas()
    assert list(acc.columns) == ["clean", "noisy", "clean_tokens", "test_tokens", "test"]
    assert np.isnan(acc.loc["train", "test_tokens"]) and not np.isnan(acc.loc["drop", "test_tokens"])
    m = sinks_run.metrics()      # the run's own end-of-epoch measures are test mode's
    assert acc.loc["test", "noisy"] == pytest.approx(m["target_memorised"][-1])
    assert acc.loc["test", "test_tokens"] == pytest.approx(m["test_accuracy"][-1])
    assert list(res["gen_units"].values) == [64, 64] and list(res["units"].values) == [128, 128]
    # routed into the sinks: the targets are reproduced through their own sinks, not without them
    assert acc.loc["train", "noisy"] >= 0.5 and acc.loc["drop", "noisy"] <= 0.1


def test_sinks_errors(tmp_path, capsys, sinks_run):
    with pytest.raises(MemlocError, match="no module of TinyGPT matches 'blocks.*.nope'"):
        train(tmp_path / "a", {**SINKS, "etd_after": "blocks.*.nope"}, device="cpu")
    with pytest.raises(MemlocError, match="has no example-tied dropout layers"):
        memloc.evaluate_dropout(train(tmp_path / "plain", {**SINKS, "etd_after": None, "epochs": 1}, device="cpu"))
    train_exit2(capsys, [str(tmp_path / "b"), "--dataset", "tinymem:mult", "--etd-after", "mlp", "--p-gen", "0"],
                "--p-gen")
    train_exit2(capsys, [str(tmp_path / "c"), "--dataset", "tinymem:mult", "--etd-after", "mlp.nope"], "matches 'mlp.nope'")
