"""Language-model runs: memloc train on a sequence corpus writes a memloc run directory (issue 23, Runs)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import memloc
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.optim import lr_factor
from memloc.training.train import train

from conftest import train_exit2

#: a tiny TinyGPT on a tiny TinyMem corpus (about a second on one core)
TINY = {"dataset": "tinymem:increment", "model": "gpt", "n_layer": 1, "d_model": 32, "n_head": 2, "n_train": 40,
        "n_test": 12, "seq_len": 20, "noise": 0.25, "epochs": 3, "batch_size": 16, "lr": 3e-3}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return train(tmp_path_factory.mktemp("lm") / "tiny", TINY, device="cpu")


def test_run_records_suffix_dynamics_and_rebuilds_model_and_data(tiny_lm):
    run = tiny_lm
    assert run.is_lm and run.epochs == [0, 1, 2, 3] and run.num_train == 40
    data = run.data()
    ref = memloc.tinymem("increment", n_train=40, n_test=12, seq_len=20, noise=0.25, seed=0)
    assert torch.equal(data.tokens, ref.tokens) and torch.equal(data.test_tokens, ref.test_tokens)
    assert np.array_equal(run.is_noisy, ref.is_memorised_target) and run.is_noisy.sum() == 10
    assert list(run.kind) == list(ref.kind)
    for name in ("suffix_loss", "suffix_accuracy", "memorised"):
        assert run.dynamics(name).shape == (4, 40)
        pres = run.dynamics(name, "presentation")
        assert pres.shape == (4, 40) and (np.isnan(pres[0]).all() if name != "memorised" else (pres[0] == -1).all())
        assert not np.isnan(pres[1:].astype(float)).any() and (pres[1:] >= 0).all()   # every sequence presented
    with pytest.raises(MemlocError, match="suffix_loss"):
        run.dynamics("margin")
    # the recorded end-of-epoch rows are what the memorisation analysis measures on the rebuilt model
    for epoch in (0, 3):
        res = memloc.memorisation(run.model(epoch), data, device="cpu")
        np.testing.assert_allclose(run.dynamics("suffix_loss")[epoch], res["suffix_loss"].values, rtol=1e-5)
        np.testing.assert_array_equal(run.dynamics("memorised")[epoch], res["memorised"].values)
        test = memloc.memorisation(run.model(epoch), data, split="test", device="cpu")
        m = run.metrics()
        assert m["test_loss"][epoch] == pytest.approx(test["suffix_loss"].values.mean(), rel=1e-5)
        assert m["test_rule_accuracy"][epoch] == pytest.approx(test["memorised"].values.mean())
    m = run.metrics()
    assert m["test_loss"][3] < m["test_loss"][0] and m["train_loss"][3] < m["train_loss"][0]   # it learns
    assert np.isnan(m["backdoor_memorised"]).all() and not np.isnan(m["noisy_memorised"]).any()
    info = json.loads((run.path / "run.json").read_text())
    assert info["kind"] == "lm" and info["model"]["spec"] == "gpt" and info["data"]["dataset"] == "tinymem:increment"
    assert (run.path / "checkpoints" / "trainer_state.pt").is_file()


def test_exact_memorisation_is_real_greedy_generation(memorising_lm):
    """The recorded one-pass memorisation flag equals greedy decoding of the suffix, checkpoint by checkpoint."""
    run, data = memorising_lm, memorising_lm.data()
    flags = []
    for epoch in run.epochs:
        generated = memloc.greedy_decode(run.model(epoch), data.prefixes, data.suffix_len)
        reproduced = (generated == data.suffixes).all(1).numpy()
        np.testing.assert_array_equal(run.dynamics("memorised")[epoch].astype(bool), reproduced)
        flags.append(reproduced)
    flags = np.concatenate(flags)
    assert flags.any() and not flags.all()      # both outcomes occur, so the equality can fail
    assert run.metrics()["noisy_memorised"][-1] > 0


def _recorded(run) -> dict:
    """Every array under /dynamics and /metrics of run.h5, as bytes (NaN-safe equality)."""
    out = {}
    with h5py.File(run.path / "run.h5", "r") as f:
        for group in ("dynamics", "metrics"):
            f[group].visititems(lambda name, obj: out.__setitem__(f"{group}/{name}", obj[()].tobytes())
                                if isinstance(obj, h5py.Dataset) else None)
    return out


def test_resume_after_interrupt_is_identical(tmp_path, tiny_lm):
    def stop_at_1(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", TINY, device="cpu", on_epoch_end=stop_at_1)
    assert memloc.load(tmp_path / "cut").epochs == [0, 1]
    cut = train(tmp_path / "cut", TINY, device="cpu", resume=True)
    assert cut.epochs == tiny_lm.epochs
    for e in cut.epochs:
        a, b = tiny_lm.checkpoint(e), cut.checkpoint(e)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), e
    assert _recorded(cut) == _recorded(tiny_lm)     # every dynamics row and metric, bit for bit
    with pytest.raises(MemlocError, match="differ from the stored run"):
        train(tmp_path / "cut", {**TINY, "d_model": 64}, device="cpu", resume=True)


@pytest.mark.slow      # importing transformers alone takes 5-15 s on 2 busy cores; the training 1 s
def test_transformers_models_train_and_rebuild(tmp_path):
    """hf:gpt2 / hf:gpt_neox / hf:llama from configs (no download), trained and rebuilt by memloc.load."""
    for family in ("gpt2", "gpt_neox", "llama"):
        cfg = {**TINY, "model": f"hf:{family}", "epochs": 2, "n_train": 16, "n_test": 4, "seq_len": 12,
               "batch_size": 8}
        run = train(tmp_path / family, cfg, device="cpu")
        model = run.model()
        assert type(model).__module__.startswith("transformers") and model.config.num_hidden_layers == 1
        state = run.checkpoint()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert run.metrics()["train_loss"][2] < run.metrics()["train_loss"][0], family


def test_cli_trains_and_refuses_bad_input(tmp_path, capsys, monkeypatch):
    base = ["--dataset", "tinymem:mult", "--model", "gpt", "--n-layer", "1", "--d-model", "32", "--n-head", "2",
            "--n-train", "16", "--n-test", "4", "--seq-len", "16", "--epochs", "1", "--device", "cpu"]
    cli_run("train", [str(tmp_path / "ok"), *base])
    out = capsys.readouterr().out
    assert "memorised: targets" in out and "rule accuracy" in out
    run = memloc.load(tmp_path / "ok")
    assert run.config["dataset"] == "tinymem:mult" and run.config["schedule"] == "warmup_cosine"
    train_exit2(capsys, [str(tmp_path / "ok"), *base], "already exists")
    train_exit2(capsys, [str(tmp_path / "a"), *base, "--prefix-len", "16"], "--prefix-len")
    train_exit2(capsys, [str(tmp_path / "b"), *base, "--dataset", "tinymem:div"], "unknown tinymem task 'div'")
    train_exit2(capsys, [str(tmp_path / "c"), *base, "--model", "hf:bert"], "unknown language model 'hf:bert'")
    train_exit2(capsys, [str(tmp_path / "d"), *base, "--vocab-size", "10"], "beyond the model's vocabulary")
    train_exit2(capsys, [str(tmp_path / "e"), *base, "--augment", "crop"], "--augment")
    train_exit2(capsys, [str(tmp_path / "f"), *base, "--dataset", "digits"], "language model")
    train_exit2(capsys, [str(tmp_path / "g"), *base, "--noise", "1.5"], "--noise")

    def unbuildable(*args, **kw):
        raise ValueError("rope needs an even head dimension")

    monkeypatch.setattr("memloc.core.lm.hf_causal_lm", unbuildable)
    train_exit2(capsys, [str(tmp_path / "h"), *base, "--model", "hf:llama"], "cannot build model 'hf:llama'")
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcdefgh")


def test_warmup_cosine_schedule():
    assert [lr_factor(s, 100, "warmup_cosine", 0.1) for s in (0, 5, 10, 55, 100)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("command", [
                                     "forgetting-order", "prune", "issues", "clean", "jtt"])
def test_image_analyses_refuse_a_language_model_run_in_one_line(command, tiny_lm, capsys):
    """The image analyses do not read sequences yet: one line saying where a language model's run goes."""
    with pytest.raises(SystemExit) as e:
        cli_run(command, [str(tiny_lm.path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "image-classifier runs" in err and "memloc.memorisation" in err and "Traceback" not in err
    assert not hasattr(tiny_lm.data(), "label_given")      # still an AttributeError for hasattr


def test_evaluation_leaves_the_training_trajectory_alone(tmp_path, tiny_lm):
    """The end-of-epoch evaluation draws no random numbers and changes no state: any eval_batch_size
    trains the same weights, bit for bit (tiny_lm evaluated by 1024)."""
    other = train(tmp_path / "by3", TINY, device="cpu", eval_batch_size=3)
    for e in tiny_lm.epochs:
        a, b = tiny_lm.checkpoint(e), other.checkpoint(e)
        assert all(torch.equal(a[k], b[k]) for k in a), e


def test_a_single_step_of_training_updates_the_model(tmp_path):
    """One epoch of one batch: the warm-up schedule's only step is taken at the peak learning rate, not at 0."""
    assert all(lr_factor(0, 1, s, 0.1) == 1.0 for s in ("onecycle", "cosine", "warmup_cosine", "constant"))
    run = train(tmp_path / "one", {**TINY, "epochs": 1, "batch_size": TINY["n_train"]}, device="cpu")
    a, b = run.checkpoint(0), run.checkpoint(1)
    assert all(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))


def test_training_has_one_eval_batch_size_default():
    """memloc.train, the language-model trainer it hands sequence corpora to, and ``memloc train``."""
    import inspect
    from memloc.cli.runner import parser
    from memloc.cli.train import COMMAND
    from memloc.training.lm import train_lm
    defaults = {inspect.signature(f).parameters["eval_batch_size"].default for f in (train, train_lm)}
    assert defaults == {parser(COMMAND).parse_args(["RUN"]).eval_batch_size}
