"""memloc.rewind, plus what the three layer analyses share (memloc.core.selection): command-line error
paths and atomic results files of gradients, rewind and retrain."""
import importlib
import shutil

import h5netcdf.core
import numpy as np
import pytest
import torch

import memloc.core.selection as L
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.evaluate import SUBSETS, accuracies
from memloc.training.train import train
from memloc.core.units import trace

R = importlib.import_module("memloc.analyses.rewind")   # memloc.rewind is the function


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
    acc, baseline = R.rewind_layers(model, [bn_run.checkpoint()], layers, data)
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
    acc, _ = R.rewind_layers(bn_run.model(), [bn_run.checkpoint(0), bn_run.checkpoint(1)], layers, data)
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
        acc, _ = R.rewind_layers(run.model(), [run.checkpoint(0), run.checkpoint(1)], [everything], data)
        for row, epoch in enumerate((0, 1)):
            want = accuracies(run.model(epoch), data)
            assert list(acc[row, 0]) == [want[s] for s in SUBSETS]
    # on MNIST (10 classes; mlp_run came last) the initialisation is at chance level
    assert acc[0, 0, SUBSETS.index("test")] < 0.2 and acc[0, 0, SUBSETS.index("clean")] < 0.2


def test_cli_on_mlp_run(mlp_run):
    """Schema, and the robust science: rewinding any single layer to its initialisation costs the
    memorised (noisy) examples more accuracy than the clean ones."""
    res = cli_run("rewind", [str(mlp_run.path), "--checkpoints", "0,1,final", "--device", "cpu", "--overwrite"])
    acc, baseline = res["accuracy"].values, res["baseline"].values
    f = mlp_run.result("rewind")
    assert f.attrs["memloc_schema"] == "memloc.rewind"
    assert list(f["checkpoint"].values) == [0, 1, mlp_run.final_epoch]
    assert list(f["layer"].values) == ["fc1", "fc2", "head"]
    assert list(f["subset"].values) == list(SUBSETS)
    assert f["accuracy"].dims == ("checkpoint", "layer", "subset")
    np.testing.assert_array_equal(f["accuracy"].values, acc)
    np.testing.assert_array_equal(f["baseline"].values, baseline)
    clean, noisy = SUBSETS.index("clean"), SUBSETS.index("noisy")
    assert baseline[noisy] > 0.95
    drop = baseline - acc[0]                      # (layer, subset) at epoch 0
    assert np.all(drop[:, noisy] > drop[:, clean])
    assert np.array_equal(acc[-1], np.broadcast_to(baseline, acc[-1].shape))


# --------------------------------------------------------------------------- shared plumbing
def test_parse_checkpoints_and_select_layers(tiny_run):
    avail = tiny_run.epochs  # 0..4
    assert L.parse_checkpoints("all", avail) == avail
    assert L.parse_checkpoints("final,0, 2-3", avail) == [0, 2, 3, 4]
    assert L.parse_checkpoints("0-4:2", avail) == [0, 2, 4]
    for bad, msg in (("5", "no checkpoint for epoch 5; available: 0-4"), ("x", "bad checkpoint 'x'"),
                     ("1-2:0", "bad checkpoint '1-2:0'")):
        with pytest.raises(MemlocError, match=msg):
            L.parse_checkpoints(bad, avail)
    s = structure(tiny_run, tiny_run.data())
    assert [l.name for l in L.select_layers(s, ["head", "fc1"])] == ["fc1", "head"]  # forward order
    with pytest.raises(MemlocError, match="unknown layer 'fc9'; valid: fc1, fc2, head"):
        L.select_layers(s, "fc1,fc9")


MODULES = ("gradients", "rewind", "retrain")
FAST = {"gradients": ["--checkpoints", "0,4"], "rewind": ["--checkpoints", "0"], "retrain": ["--epochs", "1"]}
BATCH_FLAGS = {"gradients": ["--batch-size"], "rewind": ["--eval-batch-size"],
               "retrain": ["--batch-size", "--eval-batch-size"]}


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
    epoch_flag = ["--reset-checkpoint", "99"] if name == "retrain" else ["--checkpoints", "3,99"]
    cases = [([str(no_ckpt_run)], "has no checkpoints"),
             ([str(tmp_path / "nowhere")], "not a memloc run directory"),
             ([run, *epoch_flag], "no checkpoint for epoch 99"),
             ([run, "--layers", "fc1,nope"], "unknown layer 'nope'; valid: fc1, fc2, head")]
    for argv, msg in cases:   # library errors: one line, the command's name, no traceback
        with pytest.raises(SystemExit) as e:
            cli_run(name, argv + ["--device", "cpu", "--overwrite"])
        err = capsys.readouterr().err
        assert e.value.code == 2, argv
        assert f"memloc {name}: error:" in err and msg in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    # batch sizes are range-checked by argparse now (usage line + error line, exit 2)
    for flag in BATCH_FLAGS[name]:
        with pytest.raises(SystemExit) as e:
            cli_run(name, [run, flag, "0", "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2, flag
        assert f"memloc {name}: error: argument {flag}: expected an integer >= 1, got '0'" in err, err
        assert "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # argparse errors exit 2 as well
        cli_run(name, [run, "--no-such-option"])
    assert e.value.code == 2


@pytest.mark.parametrize("name", MODULES)
def test_rerun_replaces_atomically_and_a_failed_run_leaves_the_old_file(name, tiny_run, monkeypatch, capsys):
    run = tiny_run.path
    path = run / "results" / f"{name}.h5"
    cli_run(name, [str(run), "--layers", "fc1", *FAST[name], "--device", "cpu", "--overwrite"])
    assert list(tiny_run.result(name)["layer"].values) == ["fc1"]
    content = path.read_bytes()
    with pytest.raises(SystemExit) as e:   # an existing result is kept unless --overwrite
        cli_run(name, [str(run), "--layers", "fc2,head", *FAST[name], "--device", "cpu"])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    assert path.read_bytes() == content
    cli_run(name, [str(run), "--layers", "fc2,head", *FAST[name], "--device", "cpu", "--overwrite"])  # fresh file
    assert list(tiny_run.result(name)["layer"].values) == ["fc2", "head"]
    content = path.read_bytes()

    calls = []
    real_create = h5netcdf.core.Group.create_variable

    def failing_create(*args, **kw):  # die half-way through writing the new file
        calls.append(args[1])
        if len(calls) == 3:
            raise interrupt
        return real_create(*args, **kw)

    monkeypatch.setattr(h5netcdf.core.Group, "create_variable", failing_create)
    for interrupt, code in ((RuntimeError("disk on fire"), None), (KeyboardInterrupt(), 130)):
        calls.clear()
        argv = [str(run), *FAST[name], "--device", "cpu", "--overwrite"]
        if code is None:
            with pytest.raises(RuntimeError, match="disk on fire"):
                cli_run(name, argv)
        else:
            with pytest.raises(SystemExit) as e:  # Ctrl-C: exit 130, nothing half-written
                cli_run(name, argv)
            assert e.value.code == code
        assert len(calls) == 3
        assert path.read_bytes() == content
        kept = [f"{name}.h5", f"{name}.partial"]    # parts kept for a rerun
        assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(name)) == kept
    monkeypatch.undo()      # a rerun takes the kept parts and deletes them with the saved result
    cli_run(name, [str(run), *FAST[name], "--device", "cpu", "--overwrite"])
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(name)) == [f"{name}.h5"]
