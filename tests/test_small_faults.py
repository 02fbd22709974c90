"""Small faults a new user meets (issues 25 and 26): numpy's numbers taken as the numbers they are, a missing
input result named with the command that makes it, the demo kept out of folders that are not its own,
fallbacks recorded."""
import json

import numpy as np
import pytest
import torch

import memloc
from memloc.core.registry import command
from memloc.core.runtime import check_range

TINY = {"dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 64, "lr": 0.1}


# ----------------------------------------------------------------------------- 1. numpy's integers are integers
@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3), np.array(3), 3.0])
def test_any_integral_number_is_an_integer(value):
    got = check_range("seed", value, low=0, integer=True)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), 1.5, np.float64(1.5), torch.tensor(1.5),
                                   "3", [3], None, np.array([3])])
def test_bools_fractions_and_other_things_are_not_integers(value):
    with pytest.raises(memloc.MemlocError, match="seed must be an integer"):
        check_range("seed", value, low=0, integer=True)


def test_numbers_keep_their_kind():
    assert type(check_range("lr", np.float32(0.5), low=0)) is float
    assert type(check_range("lr", np.int64(1), low=0)) is int


def test_a_run_trained_with_numpy_numbers_stores_python_numbers(tmp_path):
    run = memloc.train(tmp_path / "run", {**TINY, "epochs": np.int64(1), "batch_size": np.int32(64),
                                          "seed": np.int64(0)}, device="cpu")
    stored = json.loads((run.path / "run.json").read_text())["config"]
    assert stored["epochs"] == 1 and stored["batch_size"] == 64 and stored["seed"] == 0
    assert all(type(stored[k]) is int for k in ("epochs", "batch_size", "seed"))     # not "1" (json's default=str)


def test_child_runs_of_numpy_seeds_are_the_runs_of_int_seeds():
    from memloc.actions.children import check_seeds
    seeds = check_seeds(np.array([2, 0]))
    assert seeds == [2, 0] and all(type(s) is int for s in seeds)


# ----------------------------------------------------------------------------- 2. a missing input names its command
@pytest.fixture
def bare(tiny_run, tmp_path):
    from conftest import results_free_copy
    return results_free_copy(tiny_run, tmp_path / "run")


def _needs(call, file, command):
    with pytest.raises(memloc.MemlocError) as e:
        call()
    text = str(e.value)
    assert "\n" not in text and file in text and f"run `memloc {command} " in text and text.rstrip(")").endswith(
        "save=True") and " first" in text, text
    return e.value


def test_every_missing_input_result_names_the_command_that_makes_it(bare):
    e = _needs(lambda: memloc.scores(bare, methods="neuron_count", device="cpu"), "results/flip.h5", "flip")
    assert e.argument == "methods" and str(e).startswith("methods: neuron_count needs results/flip.h5, not in ")
    _needs(lambda: memloc.detect(bare), "no results/scores.h5 in", "scores")
    kw = dict(seeds=[0], epochs=1, device="cpu")
    e = _needs(lambda: memloc.unlearn(bare, methods="zero", **kw), "zero needs results/flip.h5", "flip")
    assert "on the forget examples first" in str(e)
    e = _needs(lambda: memloc.unlearn(bare, forget="flagged", methods="ascent", **kw), "results/issues.h5", "issues")
    assert e.argument == "forget"
    _needs(lambda: memloc.importance(bare, subsets="flagged", device="cpu"), "results/issues.h5", "issues")
    _needs(lambda: memloc.load(bare.path).result("retrain"), "no results/retrain.h5 in", "retrain")


def test_a_folder_in_place_of_a_result_is_named_as_such(bare):
    (bare.path / "results").mkdir(exist_ok=True)
    (bare.path / "results" / "scores.h5").mkdir()
    with pytest.raises(memloc.MemlocError, match="results/scores.h5 in .* is a folder, not a result file: delete it and run `memloc scores"):
        memloc.detect(bare)


def test_the_command_line_prints_it_in_one_line_with_its_flag(bare, capsys):
    from memloc.cli import run as cli_run
    with pytest.raises(SystemExit) as e:
        cli_run("unlearn", [str(bare.path), "--method", "zero", "--seeds", "0", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"--method: zero needs results/flip.h5, not in {str(bare.path)!r}: run `memloc flip {bare.path}` on " in err


def test_every_result_is_made_by_a_command_the_message_can_name():
    from memloc.core import registry
    from memloc.core.prerequisites import command_line
    for name in registry.analyses():
        line = command_line("RUN", name).strip("`")
        if line.startswith("memloc "):
            assert line.split()[1] in registry.commands() and line.endswith(" RUN"), (name, line)
        else:       # a result no command writes: the library call that saves it
            assert line.startswith("memloc.") and line.endswith(("(run, save=True)", "(...)")), (name, line)
            assert callable(getattr(memloc, line[len("memloc."):line.index("(")]))


def test_the_report_names_the_commands_of_the_findings_it_lacks(bare, tmp_path):
    text = memloc.report(bare, tmp_path / "report").read_text()
    line = next(l for l in text.splitlines() if "Not in this report yet" in l)
    for command in ("retrain", "issues", "clean"):
        assert f"run `memloc {command} {bare.path}`" in line


# ----------------------------------------------------------------------------- 3. the demo in its own folder
def _fake_steps(monkeypatch, tiny_run, stop_at=None, quick_epochs=4):
    """The demo's commands replaced by their outputs: a copy of ``tiny_run`` (4 epochs) for training (the
    demo's quick runs train ``quick_epochs``, its full ones 8), an empty result file, a report; ``stop_at``:
    the step that is killed."""
    import shutil
    from memloc.cli import demo as demo_module
    calls, count = [], [0]

    def fake(name, argv):
        calls.append((name, list(argv)))
        count[0] += 1
        if count[0] == stop_at:
            raise KeyboardInterrupt
        target = demo_module.Path(argv[0])
        if name == "train":
            shutil.copytree(tiny_run.path, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("results", "report", "children", "*.lock"))
        elif name == "report":
            (target / "report").mkdir(exist_ok=True)
            (target / "report" / "report.md").write_text("#")
        else:
            (target / "results").mkdir(exist_ok=True)
            (target / "results" / f"{command(name).result or name}.h5").write_bytes(b"")   # its result file
    monkeypatch.setattr(demo_module, "run", fake)
    for key in ("epochs", "etd_epochs", "lm_epochs"):
        monkeypatch.setitem(demo_module.SETTINGS, key, ("8", str(quick_epochs)))
    return calls


def test_a_rerun_of_the_demo_in_its_own_folder_continues_where_it_stopped(tiny_run, tmp_path, monkeypatch, capsys):
    from memloc.cli.demo import demo, steps
    out = tmp_path / "out"
    calls = _fake_steps(monkeypatch, tiny_run, stop_at=6)
    with pytest.raises(KeyboardInterrupt):
        demo(out, quick=True, device="cpu")
    assert [c[0] for c in calls] == ["train", "gradients", "rewind", "retrain", "flip", "scores"]
    calls.clear()
    demo(out, quick=True, device="cpu")           # it used to refuse: "already exists; choose a new output folder"
    plan = steps(out, True, "cpu")
    assert [c[0] for c in calls] == [name for _, name, _ in plan[5:]]
    assert f"[1/{len(plan)}] train the MLP on MNIST-5k with 10% label noise: done before, kept" in capsys.readouterr().out
    calls.clear()
    demo(out, quick=True, device="cpu")           # everything done: nothing runs
    assert calls == []


def test_a_demo_run_whose_training_was_interrupted_resumes_it(tiny_run, tmp_path, monkeypatch):
    from memloc.cli.demo import demo
    out = tmp_path / "out"
    _fake_steps(monkeypatch, tiny_run, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        demo(out, quick=True, device="cpu")
    info = json.loads((out / "mnist5k-mlp" / "run.json").read_text())
    info["config"]["epochs"] = 6              # what the step asks; the copy holds 4 epochs: an interrupted training
    (out / "mnist5k-mlp" / "run.json").write_text(json.dumps(info))
    calls_stop = _fake_steps(monkeypatch, tiny_run, stop_at=1, quick_epochs=6)
    with pytest.raises(KeyboardInterrupt):
        demo(out, quick=True, device="cpu")
    assert calls_stop[0][0] == "train" and calls_stop[0][1][-1] == "--resume"


def test_a_full_demo_refuses_the_folder_of_a_quick_one(tiny_run, tmp_path, monkeypatch, capsys):
    from memloc.cli import run as cli_run
    out = tmp_path / "out"
    _fake_steps(monkeypatch, tiny_run, stop_at=2)
    with pytest.raises(SystemExit):     # (Ctrl-C: exit status 130)
        cli_run("demo", [str(out), "--quick", "--device", "cpu"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_run("demo", [str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "is a demo run of 4 epochs, this demo trains 8" in err, err


# ----------------------------------------------------------------------------- 4. fallbacks recorded
def test_the_methods_all_leaves_out_are_recorded_with_why(bare):
    """unlearn(methods=None / "all") runs the methods whose inputs the run has; those left out are in the
    result's config ("skipped") and its summary and report say so (the layer retrain_layer falls back to is
    tests/test_unlearn.py's)."""
    from types import SimpleNamespace
    from memloc.actions.unlearn import _layer_note, available_methods, unavailable_methods
    skipped = unavailable_methods(bare)
    assert sorted(skipped) == ["etd_drop", "zero"] and not set(skipped) & set(available_methods(bare))
    assert skipped["zero"].startswith("zero needs results/flip.h5") and f"`memloc flip {bare.path}` first" in skipped["zero"]
    note = _layer_note(SimpleNamespace(config={"skipped": skipped}))
    assert note == [f"zero skipped: {skipped['zero']}", f"etd_drop skipped: {skipped['etd_drop']}"]


def test_clean_without_cleanlab_installed_says_so_before_any_work(bare, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cleanlab", None)          # what an absent package imports as
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    with pytest.raises(memloc.MemlocError, match="the cleanlab baseline needs the cleanlab package"):
        memloc.clean(bare, seeds=[0], device="cpu")
    assert not (bare.path / "results" / "issues.h5").exists() and not (bare.path / "children").exists()


# ----------------------------------------------------------------------------- 3. importance says why it has no overlap
def test_importance_without_a_flip_result_says_in_its_report_which_command_gives_the_overlap(bare, tmp_path):
    from memloc.analyses.importance import plot_importance
    memloc.importance(bare, subsets="noisy", device="cpu", save=True)
    res = bare.result("importance")          # as saved: the report reads what the store wrote
    assert "flip_overlap" not in res
    section = plot_importance(res, tmp_path)
    said = [line for line in section.splitlines() if "overlap" in line]
    assert said == [f"Flip overlap not computed: no results/flip.h5 in the run: run `memloc flip {bare.path}` first, "
                    f"then `memloc importance {bare.path} --overwrite`."], section
    assert "flip overlap not computed: no results/flip.h5" in command("importance").summary(res, None)
    # asked without the noisy subset, the reason is that one
    assert memloc.importance(bare, subsets="clean", device="cpu").config["flip_overlap_missing"] == \
        "the noisy subset was not asked for"


def test_importance_takes_an_ids_subset_whole_from_the_library_and_the_command_line(bare):
    from memloc.cli import run as cli_run
    from memloc.core.tasks import split_subsets
    assert split_subsets("ids:3,1,2") == split_subsets(["ids:3,1,2"]) == ["ids:3,1,2"]
    assert split_subsets("clean,noisy") == split_subsets(["clean", "noisy"]) == ["clean", "noisy"]
    assert split_subsets(["clean", "ids:1,2", "class:3,all"]) == ["clean", "ids:1,2", "class:3", "all"]
    got = cli_run("importance", [str(bare.path), "--subsets", "ids:3,1,2", "--device", "cpu"])
    assert list(got["subset"].values) == ["ids:3,1,2"] and int(got["examples"].values[0]) == 3
