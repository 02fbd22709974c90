"""Integration: ``python -m memloc demo OUT --quick`` end to end, and the report on its own."""
import re

import h5py
import matplotlib.image as mpimg
import pytest

from memloc.cli import run as cli_run
from memloc.cli.demo import steps
from conftest import results_free_copy


def demo_main(argv):
    return cli_run("demo", argv)

RESULTS = {
    "mnist5k-mlp": ["gradients", "rewind", "retrain", "flip", "scores", "detect", "issues", "clean", "importance",
                    "unlearn"],
    "mnist5k-lenet-etd": ["dropout"],
    "tinymem-gpt": ["memorisation", "rewind", "localise_neurons", "mitigation"],
}
FIGURES = {
    "mnist5k-mlp": ["training", "gradients_norms", "gradients_cosine", "rewind", "retrain", "flip", "detect_roc",
                    "issues", "clean", "importance", "unlearn"],
    "mnist5k-lenet-etd": ["training", "dropout"],
    "tinymem-gpt": ["lm_training", "memorisation", "rewind", "localise_neurons", "mitigation"],
}


# Settings of the quick demo cut further here (the steps, their order and every other setting unchanged):
# the example-tied-dropout lenet (width 4) was ~45% of the test's CPU time at 8 epochs; then the MLP's 15 epochs,
# trained twice (the run, clean's retraining), were ~55% (now 10, its checkpoint ranges within them: by then ~40% of
# the noisy labels are memorised, so that some of flip's 15 noisy examples flip, as unlearn's zero method needs).
CHEAPER = {"etd_epochs": "1", "retrain_epochs": "1", "unlearn_epochs": "1", "unlearn_retrain_epochs": "1",
           "epochs": "10", "grad_epochs": "0-10:2", "rewind_epochs": "0-10:5", "flip_examples": "noisy:15,clean:5"}


@pytest.mark.slow
def test_demo_quick_produces_every_result_and_figure(tmp_path, capsys, monkeypatch):
    from memloc.cli import demo as demo_module
    for key, quick in CHEAPER.items():
        monkeypatch.setitem(demo_module.SETTINGS, key, (demo_module.SETTINGS[key][0], quick))
    out = tmp_path / "demo"
    demo_main([str(out), "--quick", "--device", "cpu"])
    printed = capsys.readouterr().out
    for run, names in RESULTS.items():
        for name in names:
            path = out / run / "results" / f"{name}.h5"
            assert str(path) in printed
            with h5py.File(path) as f:
                assert f.attrs["memloc_schema"] == f"memloc.{name}"
        md = (out / run / "report" / "report.md").read_text()
        linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))
        assert {f"{fig}.png" for fig in FIGURES[run]} <= linked
        for fig in linked:
            img = mpimg.imread(out / run / "report" / fig)
            assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
    demo_main([str(out), "--quick", "--device", "cpu"])     # a rerun in its own folder keeps every finished step
    kept = capsys.readouterr().out
    assert kept.count("done before, kept") == len(steps(out, True, "cpu")) and "python -m memloc" not in kept


def test_report_on_training_only(tiny_run, tmp_path, capsys):
    run = results_free_copy(tiny_run, tmp_path / "run")        # other tests save results into tiny_run
    md = cli_run("report", [str(run.path), "--out", str(tmp_path / "rep")])
    text = md.read_text()
    assert "## Training" in text and "## Layer rewinding" not in text
    assert mpimg.imread(tmp_path / "rep" / "training.png").shape[0] > 100
    with pytest.raises(SystemExit) as e:
        cli_run("report", [str(tmp_path)])
    assert e.value.code == 2 and "not a memloc run" in capsys.readouterr().err


def test_demo_refuses_a_folder_that_is_not_its_own(tiny_run, tmp_path, capsys):
    """Nothing is written into a run directory or a folder of other files (the demo used to run
    nested inside them); a new or empty folder is fine (checked up to the first step's refusal)."""
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    for out, message in [(tiny_run.path, "is a run directory"),
                         (other, "holds files that are not the demo's (notes.txt)"),
                         (other / "notes.txt", "is not a folder")]:
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        with pytest.raises(SystemExit) as e:
            demo_main([str(out), "--quick", "--device", "cpu", "--overwrite"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and "\n" not in err
        assert before is None or sorted(p.name for p in out.iterdir()) == before


def test_demo_help_has_no_markup(capsys):
    with pytest.raises(SystemExit):
        demo_main(["--help"])
    assert "``" not in capsys.readouterr().out
