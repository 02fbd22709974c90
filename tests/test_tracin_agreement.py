"""TracIn self-influence (known answer against captum's TracInCP and a per-example backward loop,
the learning-rate weights against the trainer's own schedule, the score of a real run) and the
Spearman agreement between scores / across runs (memloc.score_agreement) on synthetic results."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

import memloc
from memloc.analyses.detect import auroc
from memloc.core.optim import make_optimizer, make_schedule
from memloc.core.results import Result, load_result

scores = importlib.import_module("memloc.analyses.scores")      # the package (``memloc.scores`` is the function)
tracin_self_influence, checkpoint_lrs = scores.tracin_self_influence, scores.checkpoint_lrs
LRS = [0.5, 0.1, 0.02]


def tiny_checkpoints():
    """Linear 6->4, ReLU, Linear 4->3 (float64) at three random 'checkpoints'; 20 examples."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()  # noqa: E731
    states = [make().state_dict() for _ in LRS]
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    return make, states, x, y


def _models(make, states):
    for state in states:
        model = make()
        model.load_state_dict(state)
        yield model


def test_tracin_equals_captum_and_a_per_example_loop():
    make, states, x, y = tiny_checkpoints()
    got = tracin_self_influence(_models(make, states), LRS, x, y, batch_size=7)   # a generator: loaded lazily
    loop = np.zeros(len(y))
    for model, lr in zip(_models(make, states), LRS):
        for i in range(len(y)):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
            loop[i] += lr * sum(float((g ** 2).sum()) for g in grads)
    np.testing.assert_allclose(got, loop, rtol=1e-10)

    influence = pytest.importorskip("captum.influence")

    def load(model, name):
        model.load_state_dict(states[int(name)])
        return LRS[int(name)]

    tracin = influence.TracInCP(make(), torch.utils.data.TensorDataset(x, y), ["0", "1", "2"],
                                checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                                batch_size=7, sample_wise_grads_per_batch=True)
    with pytest.warns(UserWarning):      # captum: "Input Tensor 0 did not already require gradients"
        ref = tracin.self_influence(outer_loop_by_checkpoints=True).detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert len(set(np.round(got, 6))) == len(y)      # not a degenerate (constant) answer


def test_tracin_weights_and_models_must_pair_up():
    make, states, x, y = tiny_checkpoints()
    with pytest.raises(memloc.MemlocError, match="2 models for 3 weights") as e:
        tracin_self_influence(_models(make, states[:2]), LRS, x, y)
    assert e.value.argument == "models"
    with pytest.raises(memloc.MemlocError, match="more models than weights"):
        tracin_self_influence(_models(make, states), LRS[:2], x, y)
    with pytest.raises(memloc.MemlocError, match="finite learning rates >= 0"):
        tracin_self_influence(_models(make, states), [0.1, -1.0, 0.1], x, y)
    with pytest.raises(memloc.MemlocError, match="no checkpoints"):
        tracin_self_influence([], [], x, y)


def test_checkpoint_lrs_follow_the_trainers_schedule():
    """Mean over each epoch's steps of the lr the optimiser actually used (memloc.train's LambdaLR)."""
    num_train, batch, epochs = 300, 128, 4                  # 3 steps per epoch, the last one short
    for schedule in ("onecycle", "cosine", "constant"):
        cfg = {"lr": 0.05, "schedule": schedule, "warmup": 0.2, "epochs": epochs, "batch_size": batch}
        opt = make_optimizer([nn.Parameter(torch.zeros(1))], "sgd", lr=cfg["lr"])
        sched = make_schedule(opt, 3 * epochs, schedule, cfg["warmup"])
        used = []
        for _ in range(3 * epochs):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        want = np.array(used).reshape(epochs, 3).mean(1)
        np.testing.assert_allclose(checkpoint_lrs(cfg, range(1, epochs + 1), num_train), want, rtol=1e-12)
        np.testing.assert_allclose(checkpoint_lrs(cfg, [2, 4], num_train), want[[1, 3]], rtol=1e-12)
    with pytest.raises(memloc.MemlocError, match="outside the trained epochs 1..4"):
        checkpoint_lrs(cfg, [0, 1], num_train)
    with pytest.warns(UserWarning, match="no lr, schedule, epochs, batch_size.*weights every checkpoint 1"):
        np.testing.assert_array_equal(checkpoint_lrs({}, [1, 2, 5], 10), [1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return memloc.train(tmp_path_factory.mktemp("tracin") / "r",
                        {"dataset": "digits", "model": "mlp", "epochs": 3, "noise": 0.2, "train_size": 300},
                        device="cpu")


def test_tracin_score_of_a_run(digits_run):
    run = digits_run
    res = memloc.scores(run, methods="tracin,grand", device="cpu")
    assert res.config["tracin_epochs"] == [1, 2, 3]
    weights = checkpoint_lrs(run.config, [1, 2, 3], run.num_train)
    # the reference check: the rates the trainer's optimiser recorded (run.h5's /optimizer/lr) are the schedule's
    assert res.config["tracin_weights_from"] == "recorded"
    np.testing.assert_allclose(res.config["tracin_weights"], weights, rtol=1e-12)
    train = run.data().train
    by_hand = sum(w * scores.grad_norms(run.model(e), train.x, train.y) ** 2 for e, w in zip([1, 2, 3], weights))
    np.testing.assert_allclose(res["tracin"].values, by_hand, rtol=1e-10)
    assert res["tracin"].attrs["direction"] == 1 and "epoch" not in res["tracin"].attrs
    assert auroc(res["tracin"].values, run.is_noisy) > 0.55
    path = res.save(run.path / "results" / "scores_tracin.h5")
    assert load_result(path, "scores").equals(res)
    # the same run's scores agree with each other: tracin sums squared GraNd-type norms over checkpoints
    agree = memloc.score_agreement([res])
    assert float(agree["between"].sel(score="tracin", score_b="grand")) > 0.5
    # not a model score: a model and data give el2n and grand only, and tracin is refused
    model, data = run.model(), run.data()
    assert set(memloc.scores(model, data, device="cpu").data_vars) == {"el2n", "grand"}
    with pytest.raises(memloc.MemlocError, match="tracin needs a run's checkpoints") as e:
        memloc.scores(model, data, methods="tracin", device="cpu")
    assert e.value.argument == "methods"


def test_a_run_without_recorded_rates_falls_back_to_its_config(digits_run, tmp_path):
    """run.h5 written before /optimizer/lr existed (here: deleted from a copy): the config's schedule, as before."""
    import shutil

    import h5py
    for name in ("run.json", "run.h5"):
        shutil.copy(digits_run.path / name, tmp_path / name)
    with h5py.File(tmp_path / "run.h5", "a") as f:
        lrs = f["optimizer/lr"][:]
        del f["optimizer"]
    assert np.isnan(lrs[0]) and lrs.shape == (4,) and len(set(lrs[1:])) == 3    # onecycle: 3 different epochs
    weights, source = scores.run_lrs(memloc.load(tmp_path), [1, 3])
    assert source == "config schedule"
    np.testing.assert_allclose(weights, lrs[[1, 3]], rtol=1e-12)


# ----------------------------------------------------------------------------- agreement
def scores_result(values: dict, directions: dict, example=None) -> Result:
    n = len(next(iter(values.values())))
    ds = xr.Dataset({k: xr.Variable(("example",), np.asarray(v, dtype=np.float64), {"direction": directions[k]})
                     for k, v in values.items()},
                    coords={"example": np.arange(n) if example is None else np.asarray(example)})
    return Result("scores", ds)


def synthetic(seed=0, n=400):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    b = np.exp(3 * a)                     # increasing transform of a
    b[:7] = np.nan                        # undefined on a few examples (left out pairwise)
    # the schema names the scores: final_loss = a, el2n = exp(3a), confidence = -a (direction -1), grand = noise
    values = {"final_loss": a, "el2n": b, "confidence": -a, "grand": rng.normal(size=n)}
    return scores_result(values, {"final_loss": 1, "el2n": 1, "confidence": -1, "grand": 1})


def test_agreement_known_relations(tmp_path):
    res = memloc.score_agreement([synthetic()])
    assert res.name == "agreement" and res["between"].dims == ("score", "score_b")
    assert list(res["score"].values) == ["final_loss", "el2n", "confidence", "grand"]
    between = res["between"].to_pandas()
    related = ["final_loss", "el2n", "confidence"]     # a, exp(3a), -a with direction -1: all agree
    np.testing.assert_allclose(between.loc[related, related].values, 1.0, rtol=1e-12)
    assert abs(between.loc["final_loss", "grand"]) < 0.15 and between.loc["grand", "grand"] == pytest.approx(1)
    np.testing.assert_array_equal(between.values, between.values.T)
    assert np.isnan(res["across_runs"].values).all() and (res["pairs"].values == 0).all()   # one run
    assert load_result(res.save(tmp_path / "agreement.h5"), "agreement").equals(res)


def test_agreement_across_runs():
    first, second, other = synthetic(0), synthetic(0), synthetic(1)
    same = memloc.score_agreement([first, second], methods="final_loss,grand")
    assert list(same["score"].values) == ["final_loss", "grand"]
    np.testing.assert_allclose(same["across_runs"].values, [1.0, 1.0], rtol=1e-12)
    assert same["pairs"].values.tolist() == [1, 1] and same.config["runs"] == 2
    three = memloc.score_agreement([first, second, other])
    assert three["pairs"].values.tolist() == [3, 3, 3, 3]
    # two of the three pairs are independent draws (~0), one is identical (1)
    assert abs(float(three["across_runs"].sel(score="final_loss")) - 1 / 3) < 0.1
    # between is the mean over runs: the relations hold in every run
    assert float(three["between"].sel(score="final_loss", score_b="confidence")) == pytest.approx(1)


def test_agreement_errors():
    base = synthetic()
    shifted = scores_result({"final_loss": np.zeros(400)}, {"final_loss": 1}, example=np.arange(1, 401))
    with pytest.raises(memloc.MemlocError, match=r"source\[1\] is over other examples") as e:
        memloc.score_agreement([base, shifted])
    assert e.value.argument == "source"
    with pytest.raises(memloc.MemlocError, match=r"source\[0\] is not a 'scores' result") as e:
        memloc.score_agreement([xr.Dataset()])
    assert e.value.argument == "source"
    with pytest.raises(memloc.MemlocError, match="'zzz' is not in every result") as e:
        memloc.score_agreement([base], methods="final_loss,zzz")
    assert e.value.argument == "methods"
    with pytest.raises(memloc.MemlocError, match="source is empty"):
        memloc.score_agreement([])
    flipped = scores_result({"final_loss": base["final_loss"].values}, {"final_loss": -1})
    with pytest.raises(memloc.MemlocError, match="direction -1 in source\\[1\\]"):
        memloc.score_agreement([base, flipped], methods="final_loss")
