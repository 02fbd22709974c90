"""rewind and retrain split across processes (torchrun, gloo on CPU) give exactly the
single-process result; an interrupted run's saved items are resumed, not recomputed."""
import importlib

import numpy as np
import pytest

import memloc
from memloc.cli import run as cli_run
from memloc.core import registry
from memloc.scale.parts import Parts
from memloc.training.train import train
from conftest import results_free_copy, torchrun_steps

pytestmark = pytest.mark.xdist_group("distributed_layers")     # one worker makes the module's torchrun

R = importlib.import_module("memloc.analyses.rewind")     # memloc.rewind / memloc.retrain are the functions
T = importlib.import_module("memloc.analyses.retrain")

TINY = {"dataset": "digits", "model": "mlp", "epochs": 6, "batch_size": 64, "lr": 0.1, "noise": 0.2}
KW = {"rewind": {"checkpoints": "0,3,6"}, "retrain": {"epochs": 1, "layers": "fc2,head"}}   # the resume tests
KW_ARGS = {"rewind": ["--checkpoints", "0,3,6"], "retrain": ["--epochs", "1", "--layers", "fc2,head"]}   # the same


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("dist_layers") / "tiny", TINY, device="cpu")


def _arrays(res):
    return {k: res[k].values for k in ("accuracy", "baseline")}


def _assert_same(a, b):
    for k in a:
        assert a[k].shape == b[k].shape and np.array_equal(a[k], b[k]), k


def _interrupt_after_first_part(analysis, run, monkeypatch, **kw):
    """Run ``analysis`` with its parts saved until the first part is written, then fail."""
    add = Parts.add

    def add_then_fail(self, items):
        add(self, items)
        raise RuntimeError("killed")

    monkeypatch.setattr(Parts, "add", add_then_fail)
    with pytest.raises(RuntimeError, match="killed"):
        analysis(run, device="cpu", resume="auto", **kw)
    monkeypatch.undo()


@pytest.mark.parametrize("name", ["rewind", "retrain"])
def test_interrupted_run_resumes_without_recomputing(name, run, monkeypatch):
    analysis = getattr(memloc, name)
    want = _arrays(analysis(run, device="cpu", **KW[name]))     # in one process, by default no parts
    parts = run.results_path(name).with_name(f"{name}.partial")
    assert not parts.exists()
    _interrupt_after_first_part(analysis, run, monkeypatch, **KW[name])
    files = list(parts.glob("part_*.npz"))
    assert len(files) == 1 and (parts / "settings.json").exists()
    with np.load(files[0]) as f:
        saved = {tuple(k) for k in f["keys"].tolist()}

    computed = []
    if name == "rewind":
        accuracy = R._Rewinder.accuracy

        def counted(self, state, i):
            computed.append(i)
            return accuracy(self, state, i)
        monkeypatch.setattr(R._Rewinder, "accuracy", counted)
    else:
        retrain_layer = T.retrain_layer

        def counted(model, init, layer, *a, **kw):
            computed.append(layer.name)
            return retrain_layer(model, init, layer, *a, **kw)
        monkeypatch.setattr(T, "retrain_layer", counted)
    res = analysis(run, device="cpu", resume="auto", **KW[name])
    cells = res["accuracy"].shape[0] * (res.sizes["layer"] if name == "rewind" else 1)
    assert len(computed) == cells - len(saved) > 0       # the saved items were not redone
    _assert_same(want, _arrays(res))
    res.save(run.results_path(name))                  # its parts, beside it, are deleted once it is safe
    assert not parts.exists()
    run.results_path(name).unlink()



@pytest.fixture(scope="module")
def finished(run, tmp_path_factory):
    """rewind and retrain each interrupted after its first part in one process (on a copy of ``run`` of its own),
    then finished on 2 processes, both in one torchrun: {name: (the copy, the number of parts it was left with,
    its torchrun step)}."""
    folder = tmp_path_factory.mktemp("dist_layers_torchrun")
    copies, left = {name: results_free_copy(run, folder / name) for name in KW}, {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, copy in copies.items():
            _interrupt_after_first_part(getattr(memloc, name), copy, monkeypatch, **KW[name])
            left[name] = len(list(copy.results_path(name).with_name(f"{name}.partial").glob("part_*.npz")))
    steps = torchrun_steps(folder / "steps", {name: ["-m", "memloc", name, copies[name].path, *KW_ARGS[name],
                                                     "--device", "cpu"] for name in KW},     # the same settings as KW
                           env={"PYTHONWARNINGS": "ignore"})
    return {name: (copies[name], left[name], steps[name]) for name in KW}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rewind", "retrain"])
def test_two_processes_finish_an_interrupted_run(name, run, finished):
    want = _arrays(getattr(memloc, name)(run, device="cpu", **KW[name]))
    copy, left, step = finished[name]
    parts = copy.results_path(name).with_name(f"{name}.partial")
    assert left == 1
    assert step.ok().out.count("wrote ") == 1         # rank 0 alone saves and reports
    _assert_same(want, _arrays(memloc.load(copy.path).result(name)))   # 2 processes finish what 1 began = 1 alone
    assert not parts.exists()


def test_parts_of_other_settings_are_not_mixed_in(run):
    parts = run.results_path("rewind").with_name("rewind.partial")
    store = Parts(parts, {"checkpoints": [0]}, what="rewind")
    store.add({(0, 0): np.zeros(4)})
    store.release()
    with pytest.raises(memloc.MemlocError, match="different settings"):
        memloc.rewind(run, checkpoints="0", device="cpu", resume="auto")
    res = memloc.rewind(run, checkpoints="0", device="cpu", resume="auto", overwrite=True)
    assert res["accuracy"].values.any()          # the zeros of the other settings were discarded
    res.save(run.results_path("rewind"))
    assert not parts.exists()
    run.results_path("rewind").unlink()



def test_which_commands_split_their_work(run, monkeypatch, capsys):
    sharded = {n for n in registry.commands() if registry.command(n).sharded}
    assert sharded == {"flip", "rewind", "retrain", "scores", "gradients", "prune", "clean", "jtt", "train",
                       "localise-neurons"}
    monkeypatch.setenv("WORLD_SIZE", "2")       # the others refuse torchrun (each process would redo it all)
    with pytest.raises(SystemExit) as e:
        cli_run("importance", [str(run.path), "--device", "cpu"])
    assert e.value.code == 2 and "does not split its work" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:        # a command that cannot split says why, in one line
        cli_run("mitigate", [str(run.path), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "does not split its work across processes (each method is one " \
        "joint edit of the model over all memorised targets" in err


def test_retrain_evaluations_handed_off_give_the_same_curve(run):
    """Under torchrun a layer's per-epoch evaluations may run on another rank, from the layer's tensors
    handed over and a model set up there: in one process, the same hand-over gives the same curve, bit for bit."""
    from memloc.core.selection import prepare
    p = prepare(run, None, device="cpu", layers="fc1", checkpoints="final")
    init, layer = run.checkpoint(0), p.layers[0]
    setup = dict(eval_batch_size=256, prefix_cache=True, prefix_cache_mb=T.CACHE_MB, precision="fp32", batch_size=64,
                 seed=0)
    want = T.retrain_layer(p.model, init, layer, p.data, epochs=2, **setup)[0]
    maker = T._Retraining(p.model, init, layer, p.data, **setup)
    states = [maker.state()]
    maker.train(lambda epoch: states.append(maker.state()), epochs=2, lr=0.1, batch_size=64, momentum=0.9,
                weight_decay=5e-4, seed=0, optimizer="sgd")
    helper = T._Retraining(p.model, init, layer, p.data, **setup)     # another rank's own set-up
    got = np.stack([helper.row(states[j]) if j % 2 else maker.row(states[j]) for j in (2, 0, 1)])[[1, 2, 0]]
    assert len(states) == 3 and not np.array_equal(want[0], want[-1])     # the layer was retrained
    assert np.array_equal(got, want)
