"""The result store (memloc.core.store): the library's ``save=True`` resumes, locks and saves like the
command; no side channel on results; errors name options in the caller's words."""
import inspect
import pickle

import pytest

import memloc
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.core.runtime import FileLock
from memloc.core.store import ResultStore
from conftest import results_free_copy

FLIP = {"examples": "noisy:3,clean:3", "max_units": 20}


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the tiny run without results (these tests write results into it)."""
    return results_free_copy(tiny_run, tmp_path / "run")


def test_save_true_writes_what_it_returns_and_refuses_to_replace_it(run):
    res = memloc.rewind(run, checkpoints="0,2", device="cpu", save=True)
    path = run.results_path("rewind")
    assert path.is_file() and run.result("rewind").equals(res)
    assert res.attrs["run_fingerprint"] == run.fingerprint      # it knows its run, as the command's results do
    with pytest.raises(MemlocError) as e:
        memloc.rewind(run, checkpoints="0,2", device="cpu", save=True)
    assert "exists (possibly with different settings); use overwrite=True to replace it" in str(e.value)
    again = memloc.rewind(str(run.path), checkpoints="0,4", device="cpu", save=True, overwrite=True)   # a path too
    assert run.result("rewind").equals(again) and not again.equals(res)


def test_save_true_equals_the_command(run, capsys):
    lib = memloc.flip(run, **FLIP, device="cpu", save=True)
    cli_run("flip", [str(run.path), "--examples", "noisy:3,clean:3", "--max-units", "20", "--device", "cpu",
                     "--overwrite"])
    cli = run.result("flip")
    assert lib.config == cli.config and lib.dataset.equals(cli.dataset)


def test_save_true_resumes_interrupted_work_and_then_deletes_it(run, monkeypatch):
    """A search interrupted after its first saved part is continued by the next save=True call (as by
    the command); once the result is safe its parts folder is gone."""
    search = __import__("importlib").import_module("memloc.analyses.flip.driver")
    real, calls = search._search, []

    def interrupted(*a, **kw):          # the first call saves some searches, then Ctrl-C
        todo = list(a[5])
        calls.append(len(todo))
        if len(calls) == 1:
            real(*a[:5], todo[:2], *a[6:], **kw)
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(search, "_search", interrupted)
    with pytest.raises(KeyboardInterrupt):
        memloc.flip(run, **FLIP, device="cpu", save=True)
    partial = run.results_path("flip").with_name("flip.partial")
    assert partial.is_dir() and not run.results_path("flip").exists()
    res = memloc.flip(run, **FLIP, device="cpu", save=True)
    assert calls[1] < calls[0]              # the saved searches were not redone
    assert not partial.exists() and run.result("flip").equals(res)
    monkeypatch.setattr(search, "_search", real)
    assert memloc.flip(run, **FLIP, device="cpu").dataset.equals(res.dataset)     # the same as one go


def test_save_true_holds_the_results_lock(run):
    lock = FileLock(run.results_path("rewind").with_name(".rewind.lock"), "busy")
    try:
        with pytest.raises(MemlocError, match="another memloc.rewind is running on"):
            memloc.rewind(run, checkpoints="0", device="cpu", save=True)
    finally:
        lock.release()
    assert not run.results_path("rewind").exists()


def test_save_needs_a_run_and_overwrite_needs_save(run):
    model, data = run.model(), run.data()
    with pytest.raises(MemlocError, match="save=True stores the rewind result in a run directory: pass a run"):
        memloc.rewind(model, data, device="cpu", save=True)
    with pytest.raises(MemlocError, match="overwrite=True replaces a saved result: use it with save=True"):
        memloc.importance(run, device="cpu", overwrite=True)


def test_every_stored_analysis_offers_save():
    for name in ("gradients", "rewind", "retrain", "flip", "scores", "find_label_issues", "importance",
                 "evaluate_dropout", "prune", "clean", "jtt", "unlearn", "forgetting_order"):
        params = inspect.signature(getattr(memloc, name)).parameters
        assert params["save"].default is False and params["save"].kind == inspect.Parameter.KEYWORD_ONLY, name
        assert "overwrite" in params, name


def test_results_carry_no_side_channel(run):
    res = memloc.flip(run, **FLIP, device="cpu")
    assert not hasattr(res, "parts")
    with ResultStore(run, "flip") as store:
        assert store.path == run.results_path("flip") and store.partial.name == "flip.partial"


def test_errors_name_options_in_the_callers_words(run, tmp_path, capsys):
    e = MemlocError("give {data_root} (add {download})", argument="data_root",
                    options={"data_root": "DIR", "download": True})
    assert str(e) == "give data_root=DIR (add download=True)"
    assert e.render(lambda name, value: f"--{name}") == "give --data_root (add --download)"
    back = pickle.loads(pickle.dumps(e))        # errors cross process groups whole
    assert (str(back), back.argument, back.options) == (str(e), e.argument, e.options)
    # the command spells the same advice with its own flags
    memloc.rewind(run, checkpoints="0", device="cpu", save=True)
    with pytest.raises(SystemExit) as ex:
        cli_run("rewind", [str(run.path), "--checkpoints", "0", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and err.endswith("exists (possibly with different settings); use --overwrite to replace it")
    with pytest.raises(SystemExit):
        cli_run("train", [str(tmp_path / "c"), "--dataset", "cifar10", "--device", "cpu"])
    assert "give --data-root DIR (add --download to fetch it there once)" in capsys.readouterr().err
