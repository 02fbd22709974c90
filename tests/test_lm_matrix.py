"""Every command and Python analysis on the two kinds of language-model run memloc does not train itself
(issue 23): an HF GPT-2-config model trained in a plain user loop and recorded by SequenceRecorder
(``hf_run``), and one trained by a transformers Trainer and recorded by HFTrainerCallback
(``hf_trainer_run``). Each analysis returns its result with finite numbers of the right shape; the
image-only commands refuse such runs in one line."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import memloc
from conftest import results_free_copy
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError

pytestmark = pytest.mark.usefixtures("one_thread")

MLP = "transformer.h.0.mlp.c_proj"          # GPT-2's down-projection (a transformers Conv1D): 128 neurons


def _check(res, name, finite=(), **sizes):
    """``res`` is the ``name`` result with these dimension sizes, no inf anywhere and ``finite`` all finite."""
    assert res.name == name and {k: res.sizes.get(k) for k in sizes} == sizes, (name, dict(res.sizes))
    for var, values in res.data_vars.items():
        assert values.dtype.kind != "f" or not np.isinf(values.values).any(), (name, var)
    for var in finite:
        assert np.isfinite(res[var].values).all(), (name, var)
    return res


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:parameter 'transformer.wte.weight' is shared")      # GPT-2's tied embedding
def test_every_analysis_runs_on_a_user_loop_run_and_a_trainer_run(hf_run, hf_trainer_run, tmp_path):
    for label, shared in (("loop", hf_run[0]), ("trainer", hf_trainer_run[0])):
        run = results_free_copy(shared, tmp_path / label)
        n, cpu = run.num_train, {"device": "cpu"}
        cli_run("memorisation", [str(run.path), "--checkpoint", "1", "--device", "cpu"])     # the command path
        assert run.result("memorisation").config["checkpoint"] == 1
        mem = _check(memloc.memorisation(run, **cpu), "memorisation", ["suffix_loss", "suffix_accuracy"], sequence=n)
        memorised = np.flatnonzero(mem["memorised"].values & run.is_noisy)
        assert len(memorised) or label == "trainer"        # the loop's 6 epochs memorise part of the targets
        g = _check(memloc.gradients(run, checkpoints="final", **cpu), "gradients", ["norm", "cosine"], checkpoint=1)
        assert MLP in g["layer"].values and "transformer.wte" in g["layer"].values
        _check(memloc.rewind(run, checkpoints="0", layers=[MLP], **cpu), "rewind", ["accuracy"], checkpoint=1, layer=1)
        _check(memloc.retrain(run, epochs=1, layers=[MLP], **cpu), "retrain", ["accuracy"], layer=1, epoch=2)
        imp = _check(memloc.importance(run, method="fisher", **cpu), "importance", ["unit_importance"],
                     subset=2, layer=g.sizes["layer"])
        assert (imp["layer_importance"].values > 0).all()
        # the Trainer's callback records each epoch's learning rate; the plain loop gave its recorder no optimiser
        expect = (pytest.warns(UserWarning, match="TracIn weights every checkpoint 1") if label == "loop"
                  else contextlib.nullcontext())
        with expect:
            sc = _check(memloc.scores(run, methods="final_loss,forgetting,el2n,tracin", save=True, **cpu), "scores",
                        ["final_loss", "forgetting", "el2n", "tracin"], example=n)
        assert sc.config["tracin_weights_from"] == ("none: 1" if label == "loop" else "recorded")
        auroc = _check(memloc.detect(run), "detect", ["values"], score=4)["values"].sel(metric="auroc").values
        assert ((auroc >= 0) & (auroc <= 1)).all()
        some = [*memorised[:2], int(np.flatnonzero(~run.is_noisy)[0])]
        fl = _check(memloc.flip(run, examples=some, max_units=20, resume=None, **cpu), "flip", example=len(some))
        searched = fl["status"].values == 0
        assert searched[:len(memorised[:2])].all() and np.isfinite(fl["neuron_count"].values[searched]).all()
        _check(memloc.localise_neurons(run, examples=[0, 1], methods="zero_out,random", **cpu), "localise_neurons",
               ["score", "suffix_loss"], method=2, target=2, layer=1, neuron=128)
        _check(memloc.unlearn(run, methods=["finetune", "ascent"], seeds=(0,), epochs=1, **cpu), "unlearn",
               ["accuracy"], technique=2, forget=int(run.is_noisy.sum()))
        _check(memloc.inj_benchmark(run, n_sequences=1, n_injected=8, methods="zero_out,random", **cpu), "inj",
               ["recall"], method=2, sequence=1, layer=1)
        if len(memorised):
            _check(memloc.mitigate(run, methods="zero_out,random", fractions="0.1", **cpu), "mitigation",
                   ["targets_memorised", "test_loss"], setting=2, target=len(memorised))
            _check(memloc.del_benchmark(run, fractions="0.05", methods="random", examples="memorised:2", **cpu), "del",
                   ["loss", "test_loss"], method=1, fraction=1, target=2)
        else:                     # the Trainer's 3 epochs memorise nothing: nothing to remove, said in one line
            for call in (memloc.mitigate, memloc.del_benchmark):
                with pytest.raises(MemlocError, match="reproduces none of its memorisation targets"):
                    call(run, methods="random", fractions="0.1", **cpu)
    cli_run("report", [str(run.path)])                   # the Trainer's run: its saved results and its settings
    settings = (run.path / "report" / "report.md").read_text().split("## Settings", 1)[1]
    assert '| model | "GPT2LMHeadModel" |' in settings and '"learning_rate": 0.02' in settings


IMAGE_ONLY = ["clean", "jtt", "prune", "issues", "forgetting-order"]


@pytest.mark.parametrize("fixture", ["hf_run", "hf_trainer_run"])
def test_image_only_commands_refuse_a_recorded_run_in_one_line(fixture, request, capsys):
    """clean / jtt / prune said 'not trained by memloc train' before saying it is a language model's run;
    dropout needs example-tied dropout layers; status names no trainer defaults a user loop never had."""
    run = request.getfixturevalue(fixture)[0]
    capsys.readouterr()                                               # what the fixture's training printed
    files = lambda: sorted(p for p in run.path.rglob("*") if p.is_file() and p.suffix != ".lock")  # noqa: E731
    before = files()
    for command in [*IMAGE_ONLY, "dropout"]:
        with pytest.raises(SystemExit) as e:
            cli_run(command, [str(run.path), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert ("example-tied dropout" if command == "dropout" else "works on image-classifier runs") in err, err
        assert command == "dropout" or "memloc.flip, memloc.mitigate" in err
    assert files() == before                                          # refused before writing a result
    text = str(memloc.status(run))
    assert "recorded by your own loop" in text and "the defaults" not in text
    assert ("options: none recorded" in text) == (fixture == "hf_run")     # the Trainer's run records its arguments
