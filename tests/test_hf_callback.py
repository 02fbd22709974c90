"""A Hugging Face Trainer run recorded by memloc.HFTrainerCallback is a memloc run (issue 23, Runs; issue 26,
callbacks): its end-of-epoch dynamics are what memloc.memorisation measures on its checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")      # the Trainer needs it (the dev extra installs it)

import memloc  # noqa: E402
from conftest import HF_SIZES, hf_trainer, run_readme_example  # noqa: E402
from memloc.core.dropout import dropout_layers, example_ids, set_mode, sink_ids  # noqa: E402
from memloc.core.errors import MemlocError  # noqa: E402
from memloc.core.lm import sequence_measures  # noqa: E402
from memloc.core.optim import make_optimizer  # noqa: E402
from memloc.analyses.scores.tracin import run_lrs  # noqa: E402
from memloc.cli import run as cli_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = HF_SIZES
trainer = hf_trainer


@pytest.fixture(scope="module")
def data(hf_trainer_data):
    return hf_trainer_data


def _model(data):
    return memloc.hf_causal_lm("gpt2", vocab_size=data.vocab_size, max_len=data.seq_len, **SIZES)


def test_trainer_run_is_a_memloc_run(hf_trainer_run, data):
    run, model, cb = hf_trainer_run
    assert run.is_lm and run.epochs == [0, 1, 2, 3] and run.num_train == len(data)
    assert run.config["note"] == "tiny" and run.config["trainer"]["num_train_epochs"] == 3
    final = run.model()
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), model.state_dict().values()))
    assert torch.equal(run.data().tokens, data.tokens) and np.array_equal(run.is_noisy, data.is_memorised_target)
    m = run.metrics()
    assert m["train_loss"][-1] < m["train_loss"][0]                       # the Trainer trained the model
    assert [e["train_loss"] for e in cb.metrics] == pytest.approx(m["train_loss"][1:].tolist())
    pres = run.dynamics("memorised", "presentation")                 # ids through the items: every sequence seen
    assert (pres[0] == -1).all() and (pres[1:] >= 0).all()
    assert not any(h for h in (model._forward_hooks, model._forward_pre_hooks))   # the callback's hooks are gone
    assert run_lrs(run, [1, 2, 3])[0].tolist() == pytest.approx([2e-2] * 3, rel=1e-14)   # every step's (constant)


def test_tracin_weights_are_the_trainers_schedule(tmp_path, data):
    """Warm-up + cosine: TracIn weights each checkpoint by the mean of the rates the scheduler gave the epoch's
    steps -- transformers' own scheduler, stepped here on a stand-in optimiser."""
    from transformers import get_scheduler
    cb = memloc.HFTrainerCallback(tmp_path / "run", data)
    trainer(tmp_path / "out", _model(data), cb.train_dataset(), cb, epochs=2, lr_scheduler_type="cosine",
            warmup_steps=1).train()
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd", lr=2e-2)
    steps = 2 * -(-len(data) // 8)
    sched, used = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=steps), []
    for _ in range(steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = np.array(used).reshape(2, -1).mean(1)
    weights, source = run_lrs(memloc.load(tmp_path / "run"), [1, 2])      # what memloc.scores weights tracin by
    assert source == "recorded" and want[0] > 2 * want[1]
    np.testing.assert_allclose(weights, want, rtol=1e-12)


def test_presentation_rows_are_the_training_forwards(tmp_path, data):
    """With a learning rate of 0 (and no dropout) each training forward is the end-of-epoch forward: the
    presentation rows equal the end rows, also from a dataset of the user's own (rows found by their tokens)."""
    cb = memloc.HFTrainerCallback(tmp_path / "a", data)
    trainer(tmp_path / "out", _model(data), cb.train_dataset(), cb, epochs=1, learning_rate=0.0).train()
    run = memloc.load(tmp_path / "a")
    for name in ("suffix_loss", "suffix_accuracy", "memorised"):
        np.testing.assert_allclose(run.dynamics(name, "presentation")[1], run.dynamics(name)[1], rtol=1e-5, atol=1e-6)
    mine = [{"input_ids": row, "labels": row} for row in data.tokens.flip(0)]
    cb = memloc.HFTrainerCallback(tmp_path / "b", data)
    trainer(tmp_path / "out", _model(data), mine, cb, epochs=1, learning_rate=0.0).train()
    np.testing.assert_allclose(memloc.load(tmp_path / "b").dynamics("suffix_loss", "presentation")[1],
                               run.dynamics("suffix_loss")[1], rtol=1e-5)


def test_memorisation_gives_the_numbers_the_callback_recorded(hf_trainer_run):
    run = hf_trainer_run[0]
    for epoch in run.epochs:
        res = memloc.memorisation(run.model(epoch), run.data(), device="cpu")
        np.testing.assert_allclose(run.dynamics("suffix_loss")[epoch], res["suffix_loss"].values, rtol=1e-5)
        np.testing.assert_allclose(run.dynamics("suffix_accuracy")[epoch], res["suffix_accuracy"].values, rtol=1e-6)
        np.testing.assert_array_equal(run.dynamics("memorised")[epoch], res["memorised"].values)
        test = memloc.memorisation(run.model(epoch), run.data(), split="test", device="cpu")
        assert run.metrics()["test_loss"][epoch] == pytest.approx(test["suffix_loss"].values.mean(), rel=1e-5)


def test_a_resumed_trainer_continues_the_run(tmp_path, data, hf_trainer_run):
    """The Trainer checkpoints at epoch ends; 2 epochs, then resuming from the epoch-1 checkpoint up to 3 epochs
    (the memloc run rewound to epoch 1 and continued) gives the run of 3 epochs trained at once (the fixture's)."""
    def run(name, epochs, resume_from=None):
        cb = memloc.HFTrainerCallback(tmp_path / name, data)
        trainer(tmp_path / f"out_{name}", _model(data), cb.train_dataset(), cb, epochs=epochs, save_strategy="epoch"
                ).train(resume_from_checkpoint=resume_from)
        return cb

    run("run", 2)
    steps = sorted((tmp_path / "out_run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    resumed = run("run", 3, resume_from=str(steps[0]))
    assert memloc.load(tmp_path / "run").epochs == [0, 1, 2, 3] and len(resumed.metrics) == 2   # 2 and 3 again
    np.testing.assert_allclose(memloc.load(tmp_path / "run").dynamics("suffix_loss"),
                               hf_trainer_run[0].dynamics("suffix_loss"), rtol=1e-4)
    with pytest.raises(MemlocError, match="Trainer resumes at epoch 3"):     # a Trainer past the run's last epoch
        (tmp_path / "run" / "checkpoints" / "epoch_0003.pt").unlink()
        run("run", 4, resume_from=str(sorted((tmp_path / "out_run").glob("checkpoint-*"),
                                             key=lambda p: int(p.name.split("-")[1]))[-1]))


def test_user_mistakes(tmp_path, data):
    with pytest.raises(MemlocError, match="SequenceSet"):
        memloc.HFTrainerCallback(tmp_path / "a", data.tokens)
    cb = memloc.HFTrainerCallback(tmp_path / "b", data)
    short = torch.utils.data.Subset(cb.train_dataset(), range(8))
    with pytest.raises(MemlocError, match=f"holds 8 sequences, data holds {len(data)}"):
        trainer(tmp_path / "out", _model(data), short, cb).train()
    with pytest.raises(MemlocError, match=r"\(B, T, V\)"):
        trainer(tmp_path / "out", torch.nn.Sequential(torch.nn.Embedding(14, 14), torch.nn.Flatten()),
                cb.train_dataset(), memloc.HFTrainerCallback(tmp_path / "c", data)).train()


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    out = run_readme_example("hf-trainer", tmp_path, monkeypatch)
    run, res = out["run"], out["res"]
    assert run.epochs == [0, 1, 2, 3]
    np.testing.assert_array_equal(res["memorised"].values, run.dynamics("memorised")[-1])


def test_sinks_in_a_trainer_run(tmp_path, data):
    """A model given sinks (memloc.insert_sinks): the callback binds each row's sink id before every training
    forward. At learning rate 0 the presentation measures are the rebuilt model's train mode with every
    sequence's sink id; `memloc dropout` evaluates the recorded sinks; a row that is no sequence of data is an
    error (its sinks are unknown)."""
    model = _model(data)
    spec = memloc.insert_sinks(model, p_gen=0.5, p_mem=0.1)
    cb = memloc.HFTrainerCallback(tmp_path / "run", data)
    trainer(tmp_path / "out", model, cb.train_dataset(), cb, epochs=1, learning_rate=0.0).train()
    run = memloc.load(tmp_path / "run")
    assert run.info["model"]["etd"] == spec and spec["after"] == ["transformer.h.0.mlp.act"]
    back, rebuilt = run.data(), run.model(1)
    set_mode(rebuilt, "train")
    with torch.no_grad(), example_ids(rebuilt, sink_ids(back)):
        own = sequence_measures(rebuilt, back.tokens, back.prefix_len, back.suffix_len, eval_batch_size=64)
    np.testing.assert_allclose(run.dynamics("suffix_loss", "presentation")[1], own["suffix_loss"], rtol=1e-5)
    acc = memloc.evaluate_dropout(run, device="cpu")["accuracy"].to_pandas()
    assert acc.loc["test", "clean_tokens"] == pytest.approx(np.nanmean(run.dynamics("suffix_accuracy")[1][~run.is_noisy]))
    assert not model._forward_pre_hooks and all(layer._ids is None for layer in dropout_layers(model).values())
    foreign = [{"input_ids": row, "labels": row} for row in data.tokens]
    foreign[3] = {"input_ids": data.tokens[3].flip(0), "labels": data.tokens[3].flip(0)}
    with pytest.raises(MemlocError, match="1 rows that are no sequence of data"):
        trainer(tmp_path / "out", model, foreign, memloc.HFTrainerCallback(tmp_path / "b", data), epochs=1).train()


TORCHRUN_WORKER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    import memloc
    from transformers import Trainer, TrainingArguments
    data = memloc.tinymem("mult", n_train=16, n_test=8, seq_len=16, suffix_len=4, noise=0.5, duplicate=2)
    model = memloc.hf_causal_lm("gpt2", vocab_size=data.vocab_size, max_len=data.seq_len, **{sizes})
    memloc.insert_sinks(model, p_gen=0.5, p_mem=0.1)
    cb = memloc.HFTrainerCallback(sys.argv[1] + "/run", data)
    args = TrainingArguments(sys.argv[1] + "/out", num_train_epochs=1, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], logging_strategy="no", disable_tqdm=True, seed=0, save_strategy="no",
                             learning_rate=0.0)
    Trainer(model=model, args=args, train_dataset=cb.train_dataset(), callbacks=[cb]).train()
    rank = torch.distributed.get_rank()           # a file per rank: the two ranks' stdout lines may interleave
    open(f"{sys.argv[1]}/rank{rank}.txt", "w").write(f"ranks {torch.distributed.get_world_size()} epochs {len(cb.metrics)}")
""")


@pytest.mark.slow
def test_sinks_in_a_trainer_run_under_torchrun(tmp_path, data):
    """A Trainer with memorisation sinks in 2 gloo processes (about 25 CPU-s): every rank binds its rows' sink ids,
    their training measures are gathered for rank 0's run (at learning rate 0 every sequence's presentation row is
    the rebuilt model's train mode through its own sinks), and `memloc dropout RUN` reads the run rank 0 wrote."""
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER.replace("{sizes}", repr(SIZES)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path)]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert ranks == ["ranks 2 epochs 1", "ranks 2 epochs 0"]                                  # rank 0 alone records
    run = memloc.load(tmp_path / "run")
    assert run.epochs == [0, 1] and run.info["model"]["etd"]["after"] == ["transformer.h.0.mlp.act"]
    assert torch.equal(run.data().tokens, data.tokens)
    back, rebuilt = run.data(), run.model(1)
    set_mode(rebuilt, "train")
    with torch.no_grad(), example_ids(rebuilt, sink_ids(back)):
        own = sequence_measures(rebuilt, back.tokens, back.prefix_len, back.suffix_len, eval_batch_size=64)
    np.testing.assert_allclose(run.dynamics("suffix_loss", "presentation")[1], own["suffix_loss"], rtol=1e-5)
    acc = cli_run("dropout", [str(run.path), "--device", "cpu"])["accuracy"].to_pandas()
    clean = run.dynamics("suffix_accuracy")[1][~run.is_noisy]
    assert acc.loc["test", "clean_tokens"] == pytest.approx(np.nanmean(clean))
