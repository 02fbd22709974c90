"""memloc.rewind, plus what the three layer analyses share (memloc.layers): command-line error
paths and atomic results files of gradients, rewind and retrain."""
import shutil

import h5py
import numpy as np
import pytest
import torch

from memloc import gradients, layers as L, retrain, rewind as R
from memloc.cli import UserError
from memloc.h5 import dims
from memloc.run import SUBSETS, accuracies
from memloc.train import train
from memloc.units import trace


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    """A tiny ResNet-9 (BatchNorm everywhere) on digits."""
    return train(tmp_path_factory.mktemp("runs") / "rn", {"dataset": "digits", "model": "resnet9", "width": 4,
                                                         "epochs": 2, "batch_size": 64, "lr": 0.1})


def structure(run, data):
    return trace(run.model(), data.train.x[:2])


def test_rewind_to_final_epoch_changes_nothing(bn_run):
    data = bn_run.data()
    model = bn_run.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = structure(bn_run, data).layers
    acc, baseline = R.rewind(model, [bn_run.checkpoint()], layers, data)
    assert acc.shape == (1, len(layers), len(SUBSETS))
    assert np.array_equal(acc[0], np.broadcast_to(baseline, acc[0].shape))
    want = accuracies(model, data)
    assert list(baseline) == [want[s] for s in SUBSETS]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # caller's model untouched


def test_rewinding_one_layer_equals_loading_its_tensors(bn_run):
    """Reference: build the state_dict by hand (final tensors, one layer's from epoch 1, buffers included)."""
    data = bn_run.data()
    layers = structure(bn_run, data).layers
    layer = layers[2]
    assert layer.buffers  # a conv with its BatchNorm: running statistics are rewound too
    acc, _ = R.rewind(bn_run.model(), [bn_run.checkpoint(0), bn_run.checkpoint(1)], layers, data)
    for row, epoch in enumerate((0, 1)):
        state = bn_run.checkpoint()
        early = bn_run.checkpoint(epoch)
        state.update({k: early[k] for k in layer.keys})
        ref = bn_run.build_model()
        ref.load_state_dict(state)
        want = accuracies(ref.eval(), data)
        assert list(acc[row, 2]) == [want[s] for s in SUBSETS]


def test_rewinding_everything_gives_the_earlier_model(bn_run, mlp_run):
    for run in (bn_run, mlp_run):
        data = run.data()
        everything = L.merged_layer(structure(run, data).layers)
        acc, _ = R.rewind(run.model(), [run.checkpoint(0), run.checkpoint(1)], [everything], data)
        for row, epoch in enumerate((0, 1)):
            want = accuracies(run.model(epoch), data)
            assert list(acc[row, 0]) == [want[s] for s in SUBSETS]
    # on MNIST (10 classes; mlp_run came last) the initialisation is at chance level
    assert acc[0, 0, SUBSETS.index("test")] < 0.2 and acc[0, 0, SUBSETS.index("clean")] < 0.2


def test_cli_on_mlp_run(mlp_run):
    """Schema, and the robust science: rewinding any single layer to its initialisation costs the
    memorised (noisy) examples more accuracy than the clean ones."""
    acc, baseline = R.main([str(mlp_run.path), "--epochs", "0,1,final", "--device", "cpu"])
    with h5py.File(mlp_run.results_path("rewind"), "r") as f:
        assert f.attrs["memloc_schema"] == "memloc.rewind"
        assert list(f["epochs"][:]) == [0, 1, mlp_run.final_epoch]
        assert list(f["layers/names"].asstr()[:]) == ["fc1", "fc2", "head"]
        assert list(f["subsets/names"].asstr()[:]) == list(SUBSETS)
        assert dims(f["accuracy"]) == ["rewind_epoch", "layer", "subset"]
        np.testing.assert_array_equal(f["accuracy"][:], acc)
        np.testing.assert_array_equal(f["baseline"][:], baseline)
    clean, noisy = SUBSETS.index("clean"), SUBSETS.index("noisy")
    assert baseline[noisy] > 0.95
    drop = baseline - acc[0]                      # (layer, subset) at epoch 0
    assert np.all(drop[:, noisy] > drop[:, clean])
    assert np.array_equal(acc[-1], np.broadcast_to(baseline, acc[-1].shape))


# --------------------------------------------------------------------------- shared plumbing
def test_parse_epochs_and_select_layers(tiny_run):
    avail = tiny_run.epochs  # 0..4
    assert L.parse_epochs("all", avail) == avail
    assert L.parse_epochs("final,0, 2-3", avail) == [0, 2, 3, 4]
    assert L.parse_epochs("0-4:2", avail) == [0, 2, 4]
    for bad, msg in (("5", "no checkpoint for epoch 5; available: 0-4"), ("x", "bad epoch"),
                     ("1-2:0", "bad epoch")):
        with pytest.raises(UserError, match=msg):
            L.parse_epochs(bad, avail)
    s = structure(tiny_run, tiny_run.data())
    assert [l.name for l in L.select_layers(s, ["head", "fc1"])] == ["fc1", "head"]  # forward order
    with pytest.raises(UserError, match="unknown layer 'fc9'; valid: fc1, fc2, head"):
        L.select_layers(s, "fc1,fc9")


MODULES = {"gradients": gradients, "rewind": R, "retrain": retrain}
FAST = {"gradients": ["--epochs", "0,4"], "rewind": ["--epochs", "0"], "retrain": ["--epochs-retrain", "1"]}


@pytest.fixture()
def no_ckpt_run(tiny_run, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(tiny_run.path, path)
    for p in (path / "checkpoints").glob("epoch_*.pt"):
        p.unlink()
    return path


@pytest.mark.parametrize("name", MODULES)
def test_bad_input_exits_2_with_one_line(name, tiny_run, no_ckpt_run, tmp_path, capsys):
    run = str(tiny_run.path)
    epoch_flag = ["--reset-epoch", "99"] if name == "retrain" else ["--epochs", "3,99"]
    cases = [([str(no_ckpt_run)], "has no checkpoints"),
             ([str(tmp_path / "nowhere")], "not a memloc run directory"),
             ([run, *epoch_flag], "no checkpoint for epoch 99"),
             ([run, "--layers", "fc1", "nope"], "unknown layer 'nope'; valid: fc1, fc2, head"),
             ([run, "--batch-size", "0"], "--batch-size must be at least 1")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            MODULES[name].main(argv + ["--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2, argv
        assert f"memloc.{name}: error:" in err and msg in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as e:  # argparse errors exit 2 as well
        MODULES[name].main([run, "--no-such-option"])
    assert e.value.code == 2


@pytest.mark.parametrize("name", MODULES)
def test_rerun_replaces_atomically_and_a_failed_run_leaves_the_old_file(name, tiny_run, monkeypatch):
    run = tiny_run.path
    path = run / "results" / f"{name}.h5"
    MODULES[name].main([str(run), "--layers", "fc1", *FAST[name], "--device", "cpu"])
    with h5py.File(path, "r") as f:
        assert list(f["layers/names"].asstr()[:]) == ["fc1"]
    MODULES[name].main([str(run), "--layers", "fc2,head", *FAST[name], "--device", "cpu"])  # fresh file
    with h5py.File(path, "r") as f:
        assert list(f["layers/names"].asstr()[:]) == ["fc2", "head"]
    content = path.read_bytes()

    calls = []
    real_put = L.put

    def failing_put(*args, **kw):  # die half-way through writing the new file
        calls.append(args[1])
        if len(calls) == 3:
            raise interrupt
        return real_put(*args, **kw)

    monkeypatch.setattr(L, "put", failing_put)
    for interrupt, code in ((RuntimeError("disk on fire"), None), (KeyboardInterrupt(), 130)):
        calls.clear()
        if code is None:
            with pytest.raises(RuntimeError, match="disk on fire"):
                MODULES[name].main([str(run), *FAST[name], "--device", "cpu"])
        else:
            with pytest.raises(SystemExit) as e:  # Ctrl-C: exit 130, nothing half-written
                MODULES[name].main([str(run), *FAST[name], "--device", "cpu"])
            assert e.value.code == code
        assert len(calls) == 3
        assert path.read_bytes() == content
        assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(name)) == [f"{name}.h5"]
