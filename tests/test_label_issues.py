"""Label issues without ground truth, given labels from files, pruning / cleaning / JTT subsets."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import memloc
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.actions.prune import kept_ids
from memloc.actions.children import child_path, parent_config
from memloc.actions.jtt import error_set
from memloc.actions.prune import prune_values
from memloc.analyses.label_issues import confident_joint_rate, find_label_issues, flag_quality, flag_top, to_csv
from memloc.training.train import _loss_weights, resolve_config

TINY = {"dataset": "digits", "model": "mlp", "epochs": 2, "batch_size": 64, "lr": 0.1}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A digits run of its own (experiments write children and results into their parent)."""
    return memloc.train(tmp_path_factory.mktemp("li") / "small", {**TINY, "epochs": 3, "noise": 0.2}, device="cpu")


def _cli(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "memloc", *map(str, argv)], capture_output=True, text=True, cwd=cwd)


def _one_line_error(capsys, name, argv, needle):
    """The command (in this process) fails with one line naming ``needle``, exit status 2."""
    with pytest.raises(SystemExit) as e:
        cli_run(name, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
    return err


# ----------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.2, 0.4])
def test_confident_joint_recovers_a_known_rate(rate):
    """Synthetic probabilities: a Dirichlet mixture peaked on the true class; given labels flipped at ``rate``."""
    rng = np.random.default_rng(0)
    n, c = 6000, 10
    true = rng.integers(0, c, n)
    given, noisy = memloc.core.data.make_noisy_labels(true, rate, num_classes=c, seed=1)
    alpha = np.ones((n, c))
    alpha[np.arange(n), true] = 12.0
    probs = rng.gamma(alpha)
    probs /= probs.sum(1, keepdims=True)
    assert abs(confident_joint_rate(probs, given) - noisy.mean()) < 0.02


def test_confident_joint_equals_cleanlabs_estimate():
    count = pytest.importorskip("cleanlab.count")
    rng = np.random.default_rng(3)
    n, c = 3000, 5
    true = rng.integers(0, c, n)
    given, _ = memloc.core.data.make_noisy_labels(true, 0.25, num_classes=c, seed=2)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), true] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    joint = count.estimate_joint(given, probs)
    assert confident_joint_rate(probs, given) == pytest.approx(1 - np.trace(joint), abs=2e-3)
    with pytest.raises(MemlocError, match="not finite"):
        confident_joint_rate(np.where(np.arange(n)[:, None] == 0, np.nan, probs), given)
    tied = np.array([[0.9, 0.1]] * 7 + [[0.1, 0.9]] * 7)              # the float mean of seven 0.9s exceeds 0.9
    assert confident_joint_rate(tied, np.array([0] * 7 + [1] * 7)) == pytest.approx(0.0)


def test_flag_top_ranks_ties_and_nan():
    v = np.array([0.5, np.nan, 2.0, 0.5, 0.5, 3.0])
    rank, flagged = flag_top(v, 3)
    assert sorted(rank) == list(range(1, 7))
    assert rank[5] == 1 and rank[2] == 2 and rank[1] == 6            # highest first, NaN last
    assert flagged.sum() == 3 and flagged[5] and flagged[2] and not flagged[1]
    assert np.array_equal(flag_top(v, 3)[0], rank)                    # deterministic
    assert flag_quality(flagged, [0, 0, 1, 0, 0, 1]) == {"precision": 2 / 3, "recall": 1.0}


def test_find_label_issues_on_the_mlp_run(mlp_run, tmp_path):
    res = find_label_issues(mlp_run, device="cpu")
    rate = float(res["rate_estimate"])
    assert abs(rate - mlp_run.is_noisy.mean()) < 0.02                 # measured: 0.101 for 0.100
    flagged = res["flagged"].values.astype(bool)
    assert flagged.sum() == round(rate * mlp_run.num_train)
    q = flag_quality(flagged, mlp_run.is_noisy)
    assert q["precision"] > 0.8 and q["recall"] > 0.8
    assert np.array_equal(np.sort(res["rank"].values), np.arange(1, mlp_run.num_train + 1))
    assert np.all(res["suspicion"].values[flagged].min() >= res["suspicion"].values[~flagged].max())
    # the early model's prediction is mostly the true label of the flagged noisy examples
    hit = flagged & mlp_run.is_noisy
    assert np.mean(res["label_predicted"].values[hit] == mlp_run.label_true[hit]) > 0.9
    assert np.array_equal(res["label_given"].values, mlp_run.label_given)
    # the CSV: one row per example, most suspicious first
    df = pd.read_csv(to_csv(res, tmp_path / "issues.csv"), index_col="id")
    assert len(df) == mlp_run.num_train and list(df["rank"]) == list(range(1, mlp_run.num_train + 1))
    assert {"flagged", "label_given", "label_predicted", "confidence", "el2n", "aum", "forgetting"} <= set(df.columns)
    assert df["flagged"].sum() == flagged.sum()


def test_issues_command_and_its_errors(small, tmp_path, capsys):
    out = tmp_path / "flags.csv"
    r = _cli("issues", small.path, "--out", out, "--device", "cpu", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "estimated noise rate" in r.stdout and "precision" in r.stdout and out.is_file()
    assert memloc.load(small.path).result("issues")["rate_estimate"] >= 0
    for argv, needle in [(["--by", "bogus"], "--by"), (["--rate", "1.5"], "--rate"),
                         (["--also", tmp_path], "not a memloc run")]:
        _one_line_error(capsys, "issues", [small.path, *argv, "--overwrite"], needle)


def test_scores_are_averaged_over_runs_of_the_same_data(small, tmp_path):
    seed1 = memloc.train(tmp_path / "seed1", {**TINY, "epochs": 3, "noise": 0.2, "seed": 1}, device="cpu")
    both = find_label_issues([small, seed1], device="cpu")
    one = [find_label_issues(r, device="cpu") for r in (small, seed1)]
    assert np.allclose(both["scores"].values, (one[0]["scores"].values + one[1]["scores"].values) / 2)
    assert not np.allclose(one[0]["scores"].values, one[1]["scores"].values)
    other = memloc.train(tmp_path / "other", {**TINY, "noise_seed": 5}, device="cpu")
    with pytest.raises(MemlocError, match="same examples and labels"):
        find_label_issues([small, other], device="cpu")


# ----------------------------------------------------------------------------- labels from a file
@pytest.mark.parametrize("fmt", ["npy", "csv", "pt"])
def test_labels_file_round_trip(tmp_path, fmt):
    data = memloc.core.data.build_data({"dataset": "digits", "noise": 0.0})
    labels = data.label_true.copy()
    labels[:50] = (labels[:50] + 3) % 10                             # 50 "annotator errors"
    path = tmp_path / f"labels.{fmt}"
    if fmt == "npy":
        np.save(path, labels)
    elif fmt == "csv":
        pd.DataFrame({"id": np.arange(len(labels))[::-1], "label": labels[::-1]}).to_csv(path, index=False)
    else:
        torch.save({"worse_label": torch.from_numpy(labels), "clean": data.label_true}, path)
        path = f"{path}:worse_label"
    run = memloc.train(tmp_path / "run", {**TINY, "epochs": 1, "labels": str(path)}, device="cpu")
    assert np.array_equal(run.label_given, labels) and np.array_equal(run.label_true, data.label_true)
    assert run.is_noisy.sum() == 50 and run.config["noise"] == 0.0
    if fmt == "npy":
        (tmp_path / "labels.npy").unlink()                           # the run rebuilds from its stored labels
    assert np.array_equal(memloc.load(run.path).data().label_given, labels)


def test_labels_file_errors(tmp_path, capsys):
    n = len(memloc.core.data.build_data({"dataset": "digits", "noise": 0.0}).label_true)
    np.save(tmp_path / "short.npy", np.zeros(n - 1, np.int64))
    np.save(tmp_path / "range.npy", np.full(n, 10))
    torch.save({"a": torch.zeros(n)}, tmp_path / "d.pt")
    (tmp_path / "x.json").write_text("[]")
    cases = [("short.npy", [], f"has {n - 1} entries; the training set has {n} examples"),
             ("range.npy", [], "outside 0..9"), ("d.pt", [], "give it as"), ("x.json", [], "unknown format"),
             ("missing.npy", [], "does not exist"), ("short.npy", ["--noise", "0.1"], "exclude each other")]
    for name, extra, needle in cases:
        err = _one_line_error(capsys, "train", [tmp_path / "run", "--dataset", "digits", "--epochs", "1", "--labels",
                                                tmp_path / name, *extra, "--device", "cpu"], needle)
        assert "--labels" in err
        assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- subsets and weights
def test_subset_run_holds_exactly_the_kept_examples(tmp_path):
    full = memloc.core.data.build_data({**TINY, "noise": 0.2})
    keep = np.arange(0, len(full.label_true), 3)
    run = memloc.train(tmp_path / "sub", {**TINY, "noise": 0.2, "epochs": 1, "subset": keep[::-1].tolist()},
                       device="cpu")
    assert run.num_train == len(keep)
    assert np.array_equal(run.label_given, full.label_given[keep]) and np.array_equal(run.is_noisy, full.is_noisy[keep])
    rebuilt = run.data()
    assert torch.equal(rebuilt.train.x, full.train.x[torch.from_numpy(keep)])
    assert np.array_equal(rebuilt.source_index["train"], full.source_index["train"][keep])


def test_upweighting_is_exact():
    cfg = resolve_config({**TINY, "upweight": 4.0, "upweight_ids": [1, 5, 7]})
    w = _loss_weights(cfg, 10, "cpu")
    assert torch.allclose(w.mean(), torch.tensor(1.0)) and torch.allclose(w[1] / w[0], torch.tensor(4.0))
    assert _loss_weights(resolve_config({**TINY, "upweight": 4.0, "upweight_ids": list(range(10))}), 10, "cpu").eq(1).all()
    assert _loss_weights(resolve_config(TINY), 10, "cpu") is None
    with pytest.raises(MemlocError, match="outside"):
        _loss_weights(resolve_config({**TINY, "upweight": 2.0, "upweight_ids": [10]}), 10, "cpu")


def test_upweighting_everything_equals_plain_training(tmp_path):
    """Weights normalised to mean 1: upweighting every example is plain training, bit for bit;
    upweighting some examples changes the model."""
    plain = memloc.train(tmp_path / "plain", {**TINY, "epochs": 1}, device="cpu")
    n = plain.num_train
    same = memloc.train(tmp_path / "all", {**TINY, "epochs": 1, "upweight": 3.0, "upweight_ids": list(range(n))},
                        device="cpu")
    some = memloc.train(tmp_path / "some", {**TINY, "epochs": 1, "upweight": 3.0, "upweight_ids": [0, 1, 2]},
                        device="cpu")
    a, b, c = (r.checkpoint(1) for r in (plain, same, some))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_kept_ids_known_answers():
    v = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 8.0, 2.0, 6.0, 4.0])
    assert list(kept_ids(v, 0.3, mode="hardest")) == [2, 4, 6]        # 9, 7, 8
    assert list(kept_ids(v, 0.3, mode="easiest")) == [1, 5, 7]        # 1, 0, 2
    assert list(kept_ids(v, 0.3, mode="window", offset=0.2)) == [0, 4, 8]   # skip 9, 8 -> 7, 6, 5
    assert list(kept_ids(v, 1.0, mode="hardest")) == list(range(10))
    r = kept_ids(v, 0.5, mode="random", seed=1)
    assert len(r) == 5 and len(set(r)) == 5 and np.array_equal(r, kept_ids(v, 0.5, mode="random", seed=1))
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(MemlocError, match="keep"):
            kept_ids(v, bad)
    with pytest.raises(MemlocError, match="mode"):
        kept_ids(v, 0.5, mode="middle")


def test_prune_trains_on_exactly_the_kept_ids_and_reuses_runs(small):
    res = memloc.prune(small, methods="el2n", keep=[0.5], seeds=[0], device="cpu")
    parent = memloc.load(small.path)
    el2n = memloc.scores(parent, methods="el2n", checkpoint=1, device="cpu")["el2n"].values   # epoch 1 of 3
    assert np.array_equal(prune_values(parent, ["el2n"], device="cpu")["el2n"], el2n)
    grand0 = memloc.scores(parent, methods="grand", checkpoint=0, device="cpu")["grand"].values
    assert np.array_equal(prune_values(parent, ["grand"], device="cpu")["grand"], grand0)   # Data Diet: at init
    kept = np.sort(np.argsort(-el2n, kind="stable")[:round(0.5 * parent.num_train)])
    assert len(np.intersect1d(kept, kept_ids(el2n, 0.5))) >= len(kept) - 2          # up to ties at the cut
    kept = kept_ids(el2n, 0.5)
    base = parent_config(parent)
    child = memloc.load(child_path(parent, "prune-el2n-hardest-0.5-s0", {**base, "subset": kept.tolist(), "seed": 0}))
    assert np.array_equal(child.label_given, parent.label_given[kept])
    assert np.array_equal(child.data().source_index["train"], parent.data().source_index["train"][kept])
    assert float(res["test_accuracy"].sel(score="el2n", keep=0.5, seed=0)) == child.metrics()["test_accuracy"][-1]
    assert np.isclose(float(res["noisy_kept"].sel(score="el2n", keep=0.5, seed=0)),
                      parent.is_noisy[kept].sum() / parent.is_noisy.sum())
    assert float(res["full_accuracy"].sel(seed=0)) == parent.metrics()["test_accuracy"][-1]   # the parent itself
    mtime = (child.path / "run.h5").stat().st_mtime_ns
    again = memloc.prune(small, methods="el2n", keep=[0.5], seeds=[0], device="cpu")
    assert again.dataset.equals(res.dataset) and (child.path / "run.h5").stat().st_mtime_ns == mtime


def test_clean_drops_or_relabels_exactly_the_flagged(small):
    parent = memloc.load(small.path)
    flags = find_label_issues(parent, device="cpu")
    flagged = flags["flagged"].values.astype(bool)
    res = memloc.clean(parent, seeds=[0], folds=2, device="cpu")
    base = parent_config(parent)
    dropped = memloc.load(child_path(parent, "clean-memloc-drop-s0",
                                     {**base, "subset": np.flatnonzero(~flagged).tolist(), "seed": 0}))
    assert np.array_equal(dropped.label_given, parent.label_given[~flagged])
    assert int(res["flagged"].sel(flags="memloc")) == flagged.sum() and int(res["flagged"].sel(flags="cleanlab")) > 0
    assert np.isclose(float(res["noise_left"].sel(flags="memloc")), parent.is_noisy[~flagged].mean())
    assert float(res["precision"].sel(flags="memloc")) == flag_quality(flagged, parent.is_noisy)["precision"]
    relabelled = memloc.clean(parent, seeds=[0], relabel=True, baseline=False, device="cpu")
    expect = np.where(flagged, flags["label_predicted"].values, parent.label_given)
    kids = [p for p in (parent.path / "children").glob("clean-memloc-relabel-s0-*")]
    assert len(kids) == 1 and np.array_equal(memloc.load(kids[0]).label_given, expect)
    assert relabelled["test_accuracy"].shape == (2, 1)


def test_jtt_error_set_and_weights(small):
    parent = memloc.load(small.path)
    res = memloc.jtt(parent, checkpoint=1, upweight=5.0, seeds=[0], device="cpu")
    errors = error_set(parent, 1)
    assert np.array_equal(res["error_set"].values, errors)
    assert np.array_equal(errors, np.flatnonzero(parent.dynamics("correct", "end")[1] == 0))
    kid = memloc.load(child_path(parent, "jtt-T1-up5-s0", {**parent_config(parent), "seed": 0, "upweight": 5.0,
                                                          "upweight_ids": errors.tolist()}))
    assert kid.config["upweight_ids"] == errors.tolist() and kid.config["upweight"] == 5.0
    assert np.isclose(float(res["error_set_noisy"]), parent.is_noisy[errors].mean())
    acc = res["accuracy"].sel(variant="erm", seed=0)
    assert float(acc.sel(group="test")) == pytest.approx(parent.metrics()["test_accuracy"][-1])
    test = parent.data().test
    pred = parent.model().eval()(test.x).argmax(1)
    per_class = [(pred[test.y == c] == c).float().mean().item() for c in range(10)]
    assert float(acc.sel(group="worst_class")) == pytest.approx(min(per_class))


def test_experiment_commands_refuse_bad_input(small, capsys):
    for argv, needle in [(["prune", "--keep", "0"], "--keep"), (["prune", "--keep", "0.5,1.5"], "--keep"),
                         (["prune", "--by", "bogus"], "--by"), (["prune", "--seeds", "-1"], "--seeds"),
                         (["jtt", "--upweight", "0"], "--upweight"), (["jtt", "--id-epochs", "99"], "--id-epochs"),
                         (["clean", "--folds", "1"], "--folds"), (["clean", "--jobs", "0"], "--jobs")]:
        _one_line_error(capsys, argv[0], [small.path, *argv[1:], "--device", "cpu"], needle)


def test_experiments_on_a_subset_parent_use_ids_of_the_full_set(small, tmp_path):
    parent = memloc.load(small.path)
    sub = memloc.train(tmp_path / "sub", {**parent_config(parent), "subset": list(range(0, parent.num_train, 2))},
                       device="cpu")
    res = memloc.prune(sub, methods="aum", keep=[0.5], seeds=[0], device="cpu")
    kept = kept_ids(prune_values(sub, ["aum"], device="cpu")["aum"], 0.5)
    kids = list((sub.path / "children").glob("prune-aum-*"))
    assert len(kids) == 1 and res.sizes["score"] == 2
    child = memloc.load(kids[0])
    assert child.config["subset"] == (2 * kept).tolist()                 # ids of the full training set
    assert np.array_equal(child.label_given, sub.label_given[kept])
    with pytest.raises(MemlocError, match="whole training set"):
        memloc.clean(sub, relabel=True, baseline=False, seeds=[0], device="cpu")


def test_registered_dataset_takes_subset_labels_and_noise(tmp_path):
    x = torch.randn(40, 1, 4, 4)
    y = torch.arange(40) % 4

    @memloc.register_data("toy-li")
    def toy():
        return memloc.make_data(x, y, x[:8], y[:8])

    d = memloc.core.data.build_data({"dataset": "toy-li", "subset": [0, 1, 2], "noise": 0.0})
    assert len(d.label_true) == 3 and torch.equal(d.train.x, x[:3])
    noisy = memloc.core.data.build_data({"dataset": "toy-li", "noise": 0.25})
    assert noisy.is_noisy.sum() == 10 and np.array_equal(noisy.label_true, y.numpy())
    np.save(tmp_path / "l.npy", (y.numpy() + 1) % 4)
    assert memloc.core.data.build_data({"dataset": "toy-li", "labels": str(tmp_path / "l.npy")}).is_noisy.all()


def test_train_runs_takes_device_auto(tmp_path):
    """The experiment scripts pass ``--device auto`` to train_runs (as every command does)."""
    from memloc.actions.children import train_runs
    cfg = resolve_config({"dataset": "digits", "model": "mlp", "epochs": 1, "train_size": 200})
    train_runs([(tmp_path / "a", cfg)], device="auto")
    assert memloc.load(tmp_path / "a").final_epoch == 1
