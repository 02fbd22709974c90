"""Per-sequence scores and their detection of memorisation targets on language-model runs (issue 23, item 5)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memloc
from memloc.analyses import scores as S
from memloc.analyses.scores.gradnorm import grad_norms
from memloc.analyses.scores.tasks import SuffixLoss
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.lm import hf_causal_lm
from memloc.training.train import train

from conftest import results_free_copy

pytestmark = pytest.mark.usefixtures("one_thread")

#: a tiny TinyGPT on a tiny TinyMem corpus, a quarter of it noisy (under a second on one core)
TINY = {"dataset": "tinymem:increment", "model": "gpt", "n_layer": 1, "d_model": 32, "n_head": 2, "n_train": 40,
        "n_test": 8, "seq_len": 16, "noise": 0.25, "epochs": 3, "batch_size": 16, "lr": 3e-3}
#: the rule learnt before the noisy sequences are memorised: scripts/lm_benchmark.py's run, smaller
LEARNT = {"dataset": "tinymem:increment", "model": "gpt", "n_layer": 2, "d_model": 64, "n_head": 4, "n_train": 384,
          "n_test": 16, "seq_len": 24, "noise": 0.125, "epochs": 12, "batch_size": 32, "lr": 3e-3,
          "weight_decay": 0.0, "schedule": "constant"}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("lmscores") / "tiny", TINY, device="cpu")


def suffix_loss_reference(model, seq, p, s):
    """The suffix loss of one sequence written out: mean over the suffix tokens of -log softmax."""
    logits = memloc.lm_logits(model, seq[None, :p + s - 1])[0]
    logp = logits[p - 1:p + s - 1].log_softmax(-1)
    return -logp[torch.arange(s), seq[p:p + s]].mean()


def reference_grand(model, tokens, p, s):
    """One backward per sequence in float64 (eval mode): the norm over every trainable parameter's gradient."""
    model = model.double().eval()
    params = [q for q in model.parameters() if q.requires_grad]
    out = []
    for seq in tokens:
        grads = torch.autograd.grad(suffix_loss_reference(model, seq, p, s), params, allow_unused=True)
        out.append(float(sum((g ** 2).sum() for g in grads if g is not None)) ** 0.5)
    return np.asarray(out)


@pytest.mark.slow
def test_scores_find_the_targets_when_the_rule_is_learnt_before_they_are_memorised(tmp_path):
    """The rule learnt, the targets not yet memorised (about 8 s): their final suffix loss is higher and the
    loss-like scores rank them first (detect's AUROC), as for noisy labels early in an image run."""
    run = train(tmp_path / "learnt", LEARNT, device="cpu")
    m = run.metrics()
    assert m["test_accuracy"][-1] > 0.75 and m["noisy_memorised"][-1] == 0, m
    res = memloc.scores(run, methods="final_loss,confidence", device="cpu", save=True)
    final, noisy = res["final_loss"].values, run.is_noisy
    assert np.median(final[noisy]) > 1.5 * np.median(final[~noisy])
    auroc = memloc.detect(run)["values"].sel(metric="auroc").to_series()
    assert auroc["final_loss"] > 0.8 and auroc["confidence"] > 0.8, auroc.to_dict()


def test_dynamics_scores_read_the_suffix_dynamics(lm_run):
    """final_loss, cartography and forgetting: the image definitions on the recorded suffix loss and exact
    memorisation; every score but aum and neuron_count, each described for sequences."""
    res = memloc.scores(lm_run, device="cpu", methods="final_loss,confidence,variability,forgetting")
    loss = lm_run.dynamics("suffix_loss", "presentation")[1:]
    assert np.array_equal(res["final_loss"].values, lm_run.dynamics("suffix_loss", "end")[-1].astype(np.float64))
    np.testing.assert_allclose(res["confidence"].values, np.exp(-loss.astype(np.float64)).mean(0))
    np.testing.assert_allclose(res["variability"].values, np.exp(-loss.astype(np.float64)).std(0))
    assert np.array_equal(res["forgetting"].values,
                          S.forgetting_events(lm_run.dynamics("memorised", "presentation")[1:]))
    assert res.config["examples"] == "sequences" and "suffix" in res["final_loss"].attrs["description"]
    assert S.select_scores("all", lm_run) == ["final_loss", "confidence", "variability", "forgetting", "el2n",
                                              "grand", "tracin"]


def test_el2n_grand_tracin_equal_one_sequence_at_a_time_references(lm_run):
    """EL2N from the softmax written out, GraNd (one forward and backward per batch, the position
    embedding shared by the batch; a batch as long as the sequences) equal to a float64 loop of the
    suffix loss's gradient, and TracIn the learning-rate-weighted sum of squared GraNd over checkpoints."""
    data = lm_run.data()
    p, s = data.prefix_len, data.suffix_len
    res = memloc.scores(lm_run, methods="el2n,grand,tracin", checkpoint=3, eval_batch_size=p + s - 1, device="cpu")
    model = lm_run.model(3)
    with torch.no_grad():
        prob = model(data.tokens[:, :p + s - 1])[:, p - 1:].double().softmax(-1)
    err = prob - F.one_hot(data.suffixes, prob.shape[-1]).double()
    np.testing.assert_allclose(res["el2n"].values, err.norm(dim=-1).mean(1).numpy(), rtol=1e-6)
    logits = model(data.tokens[:, :p + s - 1])[:, p - 1:].detach()
    from_arrays = memloc.scores_from_arrays(logits=logits.numpy(), labels=data.suffixes.numpy())["el2n"]
    np.testing.assert_allclose(from_arrays, res["el2n"].values, rtol=1e-6)
    with pytest.raises(MemlocError, match="suffix tokens"):
        memloc.scores_from_arrays(logits=logits.numpy(), labels=data.suffixes.numpy()[:, 1:])
    rows = np.arange(0, len(data), 7)
    ref = reference_grand(lm_run.model(3), data.tokens[rows], p, s)
    np.testing.assert_allclose(res["grand"].values[rows], ref, rtol=2e-4)
    batched = grad_norms(lm_run.model(3).double(), data.tokens[rows], data.tokens[rows], batch_size=p + s - 1,
                         loss=SuffixLoss(p, s))
    np.testing.assert_allclose(batched, ref, rtol=1e-10)
    weights = res.config["tracin_weights"]      # recorded by the trainer: its warm-up + cosine schedule's
    assert res.config["tracin_weights_from"] == "recorded" and len(set(weights)) == len(weights)
    np.testing.assert_allclose(weights, S.checkpoint_lrs(lm_run.config, res.config["tracin_epochs"], len(data)),
                               rtol=1e-12)
    by_hand = sum(w * grad_norms(lm_run.model(e), data.tokens, data.tokens, loss=SuffixLoss(p, s)) ** 2
                  for e, w in zip(res.config["tracin_epochs"], weights))
    np.testing.assert_allclose(res["tracin"].values, by_hand, rtol=1e-10)


def test_a_language_model_and_its_sequences_without_a_run(lm_run):
    """A model and a SequenceSet give the model scores; the caller's model keeps its mode."""
    model, data = lm_run.model(), lm_run.data()
    model.train()
    res = memloc.scores(model, data, device="cpu")
    assert list(res.data_vars) == ["el2n", "grand"] and model.training
    with pytest.raises(MemlocError, match="training dynamics"):
        memloc.scores(model, data, methods="final_loss", device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grand_of_transformers_models_equals_the_loop(family):
    """GPT-2 without tied embeddings (its position embedding looked up once for the batch, Conv1D layers) and
    Llama (RMSNorm) by the per-layer path; GPT-2 with its tied head by the loop, with a warning."""
    data = memloc.tinymem(n_train=9, n_test=0, seq_len=12)
    p, s = data.prefix_len, data.suffix_len
    for tied in ((False, True) if family == "gpt2" else (False,)):
        model = hf_causal_lm(family, vocab_size=14, n_layer=1, n_head=2, d_model=16, max_len=16, seed=0,
                             tie_word_embeddings=tied)
        ref = reference_grand(model, data.tokens, p, s)
        with pytest.warns(UserWarning, match="tied") if tied else _no_warning():
            got = grad_norms(model.double(), data.tokens, data.tokens, batch_size=4, loss=SuffixLoss(p, s))
        np.testing.assert_allclose(got, ref, rtol=1e-10)


@pytest.mark.slow
def test_two_processes_equal_one(lm_run, tmp_path):
    """memloc scores under torchrun (2 gloo processes) writes exactly the single-process result."""
    from test_distributed import _torchrun
    run = results_free_copy(lm_run, tmp_path / "run")
    want = memloc.scores(run, device="cpu")
    p = _torchrun(["scores", str(run.path), "--device", "cpu"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    got = memloc.load(run.path).result("scores")
    for name in want.data_vars:
        assert np.array_equal(got[name].values, want[name].values), name


class _no_warning:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _exit2(capsys, command, argv, match):
    with pytest.raises(SystemExit) as e:
        cli_run(command, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and match in err, err


def test_command_line_and_errors(lm_run, tmp_path, capsys):
    """memloc scores / detect on a language model's run; aum refused in one line."""
    run = results_free_copy(lm_run, tmp_path / "run")
    with pytest.raises(MemlocError, match="does not apply to a language model"):
        memloc.scores(run, methods="aum", device="cpu")
    _exit2(capsys, "scores", [str(run.path), "--scores", "aum", "--device", "cpu"], "records no margins")
    _exit2(capsys, "detect", [str(run.path)], "run `memloc scores")
    cli_run("scores", [str(run.path), "--device", "cpu", "--scores", "final_loss,forgetting"])
    cli_run("detect", [str(run.path)])
    out = capsys.readouterr().out
    assert "10 memorisation targets" in out and "forgetting" in out
    assert set(memloc.load(run.path).result("detect")["score"].values) == {"final_loss", "forgetting"}
