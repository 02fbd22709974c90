"""The notebook path: a user's own model trained in a plain loop, recorded with ``Recorder`` fed
DataLoaders, then every analysis called from Python on the run, and every command on the same run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import memloc
from memloc.cli import run as cli_run
from memloc.core.data import build_data
from memloc.core.evaluate import SUBSETS, accuracy_row
from memloc.core.units import trace

from conftest import train_exit2

DATA_SPEC = {"dataset": "digits", "noise": 0.1}
EPOCHS = 6


@memloc.register_model("api_smallnet")
class SmallNet(nn.Module):
    """A user's own CNN for 8x8 digits (conv-bn-relu-pool, linear)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 16, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.out(torch.relu(self.fc(x.flatten(1))))


def make_net(width: int = 8):
    """Import-path factory (``test_api:make_net``) for the command line in a fresh process."""
    return SmallNet(width)


def make_shaped(in_shape, num_classes):
    """A factory that names ``in_shape`` / ``num_classes`` (the Recorder records both)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), num_classes))


def _train(run_dir, *, model_spec, etd=None, epochs=EPOCHS):
    """A plain training loop, as in a notebook; the Recorder gets DataLoaders and a Dataset."""
    data = build_data(DATA_SPEC)
    x, given, true = data.train.x, data.train.y, torch.as_tensor(data.label_true)
    torch.manual_seed(0)
    model = SmallNet(8)
    if etd is not None:
        memloc.insert_example_tied_dropout(model, **etd)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_loader = DataLoader(memloc.WithIds(TensorDataset(x, given)), batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0))
    rec = memloc.Recorder(run_dir, model, eval_train=DataLoader(TensorDataset(x, given), batch_size=256),
                          eval_test=TensorDataset(data.test.x, data.test.y), label_true=true,
                          model_spec=model_spec, model_options={"width": 8} if isinstance(model_spec, str) else None,
                          data_spec=DATA_SPEC)
    for _ in range(epochs):
        model.train()
        for xb, yb, idx in train_loader:
            if etd is not None:
                with memloc.example_ids(model, idx):
                    logits = model(xb)
            else:
                logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record_batch(idx, logits, yb)
        rec.end_epoch()
    return model, data


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "mine"
    model, data = _train(path, model_spec="api_smallnet")
    return memloc.load(path), model, data


def _roundtrip(res, path):
    res.save(path)
    back = memloc.load_result(path)
    assert back.equals(res) and back.name == res.name
    return back


def test_recorder_inputs(api_run, tmp_path):
    run, model, data = api_run
    assert run.epochs == list(range(EPOCHS + 1)) and run.is_noisy.sum() == int(0.1 * run.num_train)
    assert run.info["model"]["spec"] == "api_smallnet" and run.info["data"] == DATA_SPEC
    assert run.metrics()["test_accuracy"][-1] > 0.8 and run.metrics()["clean_accuracy"][-1] > 0.9
    final = run.model()      # rebuilt from the registry, weights from the last checkpoint
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), model.state_dict().values()))
    # tensors work too (ids = positions), and labels default to the ones the examples carry
    rec = memloc.Recorder(tmp_path / "t", SmallNet(), eval_train=(data.train.x, data.train.y))
    assert np.array_equal(rec.label_given, data.label_given) and not rec.is_noisy.any()
    assert memloc.load(tmp_path / "t").info["model"]["spec"] == "api_smallnet"   # a registered class is found
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    memloc.Recorder(tmp_path / "u", plain, eval_train=(data.train.x, data.train.y))
    for bad, msg in [(5, "expected an ExampleSet"), ({"x": 1}, "expected an ExampleSet"),
                     (DataLoader(TensorDataset(data.train.x, data.train.y), shuffle=True), "WithIds")]:
        with pytest.raises(memloc.MemlocError, match=msg):
            memloc.Recorder(tmp_path / "bad", SmallNet(), eval_train=bad, label_true=data.label_true)
    with pytest.raises(memloc.MemlocError, match="model_spec"):
        memloc.load(tmp_path / "u").build_model()


def test_every_analysis_from_python(api_run, tmp_path):
    run, model, data = api_run
    layers = trace(run.model(), data.train.x[:2]).layer_names
    assert layers == ["conv", "fc", "out"]

    g = memloc.gradients(run, checkpoints="0,3,final", device="cpu")
    assert g.name == "gradients" and dict(g.sizes) == {"checkpoint": 3, "layer": 3, "subset": 3}
    assert g["checkpoint"].values.tolist() == [0, 3, EPOCHS] and g["layer"].values.tolist() == layers
    assert g["norm"].dims == ("checkpoint", "layer", "subset") and g["layer_kind"].values.tolist() == ["conv", "linear", "linear"]
    assert float(g.sel(layer="fc", subset="noisy", checkpoint=3)["norm"]) > 0
    _roundtrip(g, tmp_path / "g.h5")

    rw = memloc.rewind(run, checkpoints="0,final", device="cpu")
    assert rw["accuracy"].dims == ("checkpoint", "layer", "subset") and rw["subset"].values.tolist() == list(SUBSETS)
    assert np.allclose(rw["baseline"].values, accuracy_row(run.model(), data))
    # rewinding to the final checkpoint changes nothing
    assert np.allclose(rw["accuracy"].sel(checkpoint=EPOCHS).values, rw["baseline"].values[None])
    # the same analysis on the model and data themselves, with the checkpoints passed in
    rw2 = memloc.rewind(model, data, checkpoints={0: run.checkpoint(0), EPOCHS: run.checkpoint()}, device="cpu")
    assert np.array_equal(rw2["accuracy"].values, rw["accuracy"].values)
    _roundtrip(rw, tmp_path / "rw.h5")

    rt = memloc.retrain(run, layers="out", epochs=1, device="cpu")
    assert rt["accuracy"].dims == ("layer", "epoch", "subset") and rt["epoch"].values.tolist() == [0, 1]
    _roundtrip(rt, tmp_path / "rt.h5")

    fl = memloc.flip(run, examples="clean:4,ids:0", max_units=30, device="cpu")
    assert fl["example"].values[-1] == 0 and fl["n_units"].dims == ("example", "repeat")
    assert fl["layer"].values.tolist() == ["conv", "fc"] and (run.path / "results" / "flip.partial").is_dir()
    fl.save(run.results_path("flip"))
    assert not (run.path / "results" / "flip.partial").exists()          # parts go once the result is saved
    assert run.result("flip").equals(fl)

    sc = memloc.scores(run, device="cpu")
    assert set(sc.data_vars) == {"final_loss", "confidence", "variability", "forgetting", "el2n", "grand", "aum",
                                 "neuron_count", "tracin"}
    df = sc.to_dataframe()
    assert df.index.name == "example" and len(df) == run.num_train and "el2n" in df.columns
    assert np.isfinite(df["neuron_count"]).sum() == int((fl["status"].values == 0).sum())
    sc.save(run.results_path("scores"))

    dt = memloc.detect(run)
    assert dt["values"].dims == ("score", "metric") and float(dt["values"].sel(score="confidence", metric="auroc")) > 0.8
    assert dt.equals(memloc.detect(sc, is_noisy=run.is_noisy))
    _roundtrip(dt, run.results_path("detect"))

    md = memloc.report(run, tmp_path / "report")
    text = md.read_text()
    assert "## Unit zeroing (flip)" in text and "## Noise detection" in text and (tmp_path / "report" / "flip.png").exists()
    assert "api_smallnet" in text and (tmp_path / "report" / "detect_roc.png").exists()


def test_model_and_data_instead_of_a_run(api_run):
    run, model, data = api_run
    g = memloc.gradients(model, data, device="cpu")
    assert g["checkpoint"].values.tolist() == [-1]
    want = memloc.gradients(run, checkpoints="final", device="cpu")
    assert np.allclose(g["norm"].values, want["norm"].values, rtol=1e-5, atol=1e-9)
    sc = memloc.scores(model, data, device="cpu")
    assert set(sc.data_vars) == {"el2n", "grand"}
    with pytest.raises(memloc.MemlocError, match="data is required"):
        memloc.gradients(model)
    with pytest.raises(memloc.MemlocError, match="checkpoints must be a mapping"):
        memloc.rewind(model, data)
    with pytest.raises(memloc.MemlocError, match="training dynamics"):
        memloc.scores(model, data, methods="aum")


def test_every_command_on_the_users_run(api_run, tmp_path, capsys):
    run, _, _ = api_run
    path = tmp_path / "copy"
    shutil.copytree(run.path, path, ignore=shutil.ignore_patterns("results", "report"))
    steps = [("gradients", ["--checkpoints", "0,final"]), ("rewind", ["--checkpoints", "0,final"]),
             ("retrain", ["--epochs", "1", "--layers", "out"]), ("flip", ["--examples", "clean:3"]),
             ("scores", []), ("detect", []), ("report", [])]
    for name, extra in steps:
        device = [] if name in ("detect", "report") else ["--device", "cpu"]
        out = cli_run(name, [str(path), *extra, *device])
        if name != "report":
            loaded = memloc.load(path).result(name)
            assert loaded.equals(out)
            assert loaded.attrs["argv"].startswith('["memloc", "' + name)
    assert (path / "report" / "report.md").exists()


def test_dropout_on_a_users_etd_model(tmp_path, capsys):
    etd = {"after": ["conv", "fc"], "p_gen": 0.5, "p_mem": 0.2, "seed": 0}
    model, data = _train(tmp_path / "etd", model_spec={"spec": "api_smallnet", "options": {"width": 8}, "etd": etd},
                         etd=etd, epochs=3)
    run = memloc.load(tmp_path / "etd")
    res = memloc.evaluate_dropout(run, device="cpu")
    assert res["accuracy"].dims == ("mode", "subset") and res["mode"].values.tolist() == ["train", "test", "drop"]
    assert res["layer"].values.tolist() == ["conv", "fc"] and res["units"].values.tolist() == [8, 32]
    assert np.isnan(float(res["accuracy"].sel(mode="train", subset="test")))
    direct = memloc.evaluate_dropout(model, data, device="cpu")
    assert np.allclose(direct["accuracy"].values, res["accuracy"].values, equal_nan=True)
    out = cli_run("dropout", [str(run.path), "--device", "cpu"])
    assert memloc.load(run.path).result("dropout").equals(out)


def test_factory_with_shapes_and_options_positional_mistake(tmp_path):
    data = build_data(DATA_SPEC)
    model = make_shaped((1, 8, 8), 10)
    memloc.Recorder(tmp_path / "s", model, eval_train=(data.train.x, data.train.y), model_spec="test_api:make_shaped")
    run = memloc.load(tmp_path / "s")
    assert run.info["model"]["in_shape"] == [1, 8, 8] and run.info["model"]["num_classes"] == 10
    assert all(torch.equal(a, b) for a, b in zip(run.model().state_dict().values(), model.state_dict().values()))
    with pytest.raises(memloc.MemlocError, match="keyword-only"):
        memloc.flip(run, "noisy:10")


@pytest.mark.slow
def test_import_path_model_from_the_command_line(tmp_path, capsys):
    """A model given as pkg.module:factory trains and is analysed by commands in fresh processes; a factory
    the module lacks is one line, exit status 2 (checked in this process: a fresh one costs ~4 CPU-s)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "r"

    def call(*argv):
        return subprocess.run([sys.executable, "-m", "memloc", *argv], env=env, capture_output=True, text=True)

    p = call("train", str(run), "--dataset", "digits", "--model", "test_api:make_net", "--epochs", "2",
             "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert memloc.load(run).info["model"]["spec"] == "test_api:make_net"
    p = subprocess.run([sys.executable, "-m", "memloc.rewind", str(run), "--checkpoints", "0", "--device", "cpu"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "Warning" not in p.stderr, p.stderr
    assert memloc.load(run).result("rewind")["layer"].values.tolist() == ["conv", "fc", "out"]
    train_exit2(capsys, [str(tmp_path / "x"), "--dataset", "digits", "--model", "test_api:nope", "--device", "cpu"],
                "has no 'nope'")


def test_a_data_spec_that_does_not_rebuild_the_recorded_examples_names_the_fix(tmp_path):
    """Your own tensors recorded under a built-in dataset's name (issue 26): the first analysis that
    rebuilds the data refuses with one message naming the two ways out (data= or a matching spec)."""
    torch.manual_seed(0)
    x, y = torch.randn(60, 1, 8, 8), torch.randint(0, 10, (60,))
    model = SmallNet(2)
    memloc.Recorder(tmp_path / "own", model, eval_train=(x, y), eval_test=(x[:10], y[:10]),
                    model_spec="api_smallnet", model_options={"width": 2}, data_spec=DATA_SPEC).close()
    run = memloc.load(tmp_path / "own")
    with pytest.raises(memloc.MemlocError, match=r"does not match its stored labels: pass data= to memloc\.load"):
        run.data()
    assert run.epochs == [0] and memloc.load(tmp_path / "own", data=memloc.make_data(x, y, x[:10], y[:10])).data().train.x.shape[0] == 60
