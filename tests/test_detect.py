"""memloc.detect: metrics on hand-made scores with known answers, the results file and figure,
reproducibility from the same seed, partial scores (neuron count), CLI errors, and the science
on the MNIST-5k MLP run (early-training scores find the noisy labels; the memorised final loss
is the weakest of them).
"""
import importlib
import shutil

import numpy as np
import pytest

from memloc.cli import run as cli_run
from memloc.reporting import report
from memloc.core.run import load
from memloc.training.train import train
from test_scores import write_flip_h5

detect = importlib.import_module("memloc.analyses.detect")      # the modules (``memloc.detect`` etc. are the functions)
scores = importlib.import_module("memloc.analyses.scores")


# ----------------------------------------------------------------------------- known answers
def test_metrics_on_hand_made_scores():
    y = np.array([1, 0, 1, 0, 0], dtype=bool)
    s = np.array([0.9, 0.8, 0.7, 0.1, 0.2])
    # ranking 0.9 (noisy), 0.8, 0.7 (noisy), 0.2, 0.1: the 2nd noisy beats 2 of 3 clean
    assert detect.auroc(s, y) == pytest.approx(5 / 6)
    assert detect.average_precision(s, y) == pytest.approx((1 + 2 / 3) / 2)
    assert detect.precision_at_k(s, y) == pytest.approx(0.5)          # k = 2
    assert detect.precision_at_k(s, y, k=3) == pytest.approx(2 / 3)
    m = detect.detection_metrics(-s, y, direction=-1)                 # direction flips the ranking back
    assert (m["auroc"], m["size"], m["noisy"], m["base_rate"]) == (pytest.approx(5 / 6), 5, 2, 0.4)
    assert detect.detection_metrics(s, y)["prec_at_k"] == pytest.approx(0.5)


def test_ties_nans_and_single_class():
    y = np.array([1, 0, 0, 0], dtype=bool)
    s = np.array([1.0, 1.0, 1.0, 0.0])
    assert detect.precision_at_k(s, y) == pytest.approx(1 / 3)        # 1 place among a 3-way tie, 1 noisy
    assert detect.auroc(s, y) == pytest.approx((0.5 + 0.5 + 1) / 3)
    m = detect.detection_metrics(np.array([np.nan, 0.2, 0.9, np.nan, 0.1]), np.array([0, 0, 1, 1, 0]))
    assert (m["size"], m["noisy"], m["auroc"], m["prec_at_k"]) == (3, 1, 1.0, 1.0)
    m = detect.detection_metrics(np.array([0.3, 0.2]), np.array([0, 0]))
    assert np.isnan(m["auroc"]) and np.isnan(m["ap"]) and np.isnan(m["prec_at_k"])
    with pytest.raises(ValueError, match="direction"):
        detect.detection_metrics(s, y, direction=0)


def test_table_and_markdown():
    y = np.array([1, 0, 1, 0, 0], dtype=bool)
    table = detect.detection_table({"a": np.array([0.9, 0.8, 0.7, 0.1, 0.2]), "b": np.array([1, 3, 2, 4, np.nan])},
                                   y, {"a": 1, "b": -1})
    assert table["names"] == ["a", "b"] and table["values"].shape == (2, len(detect.METRICS))
    np.testing.assert_array_equal(table["size"], [5, 4])
    assert table["values"][1, 0] == pytest.approx(1.0)  # lower b = noisy: the noisy rows 0, 2 have the lowest b
    md = detect.format_table(table, markdown=True).splitlines()
    assert md[0].startswith("| score |") and md[2].startswith("| a | +1 | 5 | 2 |")


# ----------------------------------------------------------------------------- CLI on a run
@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    shutil.copytree(tiny_run.path, tmp_path / "tiny")
    return load(tmp_path / "tiny")


def test_cli_file_figure_and_common_subset(tiny_copy, capsys):
    run = tiny_copy
    ids = np.concatenate([np.flatnonzero(run.is_noisy)[:5], np.flatnonzero(~run.is_noisy)[:7]])
    write_flip_h5(run, ids, np.zeros(12), np.arange(1, 13)[:, None], np.ones((12, 1)), max_units=20)
    cli_run("scores", [str(run.path), "--scores", "el2n,aum,neuron_count"])
    res = cli_run("detect", [str(run.path)])
    out = capsys.readouterr().out
    assert "every score on the 12 examples where all are defined (5 noisy)" in out
    stored = run.result("detect")
    names = stored["score"].values.tolist()
    assert names == ["el2n", "aum", "neuron_count"]
    assert stored["metric"].values.tolist() == list(detect.METRICS)
    values = stored["values"].values
    assert stored["values"].dims == ("score", "metric") and values.shape == (3, 3)
    np.testing.assert_array_equal(stored["size"].values, [run.num_train, run.num_train, 12])
    np.testing.assert_array_equal(stored["common_example"].values, np.sort(ids))
    common = stored["common_values"].values
    saved = run.result("scores")
    for i, name in enumerate(names):
        m = detect.detection_metrics(saved[name].values, run.is_noisy, direction=scores.SCORES[name].direction)
        np.testing.assert_allclose(values[i], [m[k] for k in detect.METRICS])
        m = detect.detection_metrics(saved[name].values[np.sort(ids)], run.is_noisy[np.sort(ids)],
                                     direction=scores.SCORES[name].direction)
        np.testing.assert_allclose(common[i], [m[k] for k in detect.METRICS])
    # neuron counts 1..5 for the noisy ids, 6..12 for the clean ones: fewer units = noisy -> perfect
    np.testing.assert_allclose(values[2], [1.0, 1.0, 1.0])
    # the ROC figure is drawn by the report (into the report folder), no longer by detect
    md = report(run)
    png = md.with_name("detect_roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "detect_roc.png" in md.read_text()
    assert "common_values" in res and res.sizes["common"] == 12


def test_cli_says_not_measured_instead_of_a_table_of_nan(tiny_copy, capsys):
    """A flip that searched clean examples only: neuron_count cannot rank noisy ones (issue 26)."""
    run = tiny_copy
    ids = np.flatnonzero(~run.is_noisy)[:6]
    write_flip_h5(run, ids, np.zeros(6), np.arange(1, 7)[:, None], np.ones((6, 1)), max_units=20)
    cli_run("scores", [str(run.path), "--scores", "confidence,neuron_count"])
    cli_run("detect", [str(run.path)])
    out = capsys.readouterr().out
    assert "nan" not in out and "neuron_count (6 examples, 0 noisy)" in out
    assert "where all are defined (0 noisy): not measured" in out
    assert np.isnan(run.result("detect")["values"].sel(score="neuron_count").values).all()


def test_same_seed_same_table(tmp_path):
    cfg = {"dataset": "digits", "model": "mlp", "epochs": 3, "batch_size": 64, "lr": 0.1}
    tables = []
    for name in ("a", "b"):
        run = train(tmp_path / name, cfg, device="cpu")
        cli_run("scores", [str(run.path), "--device", "cpu"])
        cli_run("detect", [str(run.path)])
        tables.append(run.result("detect")["values"].values)
    np.testing.assert_array_equal(tables[0], tables[1])
    assert np.isfinite(tables[0]).all()


@pytest.mark.parametrize("setup, argv, message", [
    ("none", [], "no results/scores.h5 in"),
    ("scores", ["--scores", "aum,bogus"], "score 'bogus' not among the stored scores"),
    ("norun", [], "no run.json"),
])
def test_cli_errors_exit_2(tiny_copy, tmp_path, capsys, setup, argv, message):
    path = tmp_path / "empty" if setup == "norun" else tiny_copy.path
    if setup == "scores":
        cli_run("scores", [str(path), "--scores", "aum"])
    with pytest.raises(SystemExit) as e:
        cli_run("detect", [str(path), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


# ----------------------------------------------------------------------------- science
@pytest.mark.slow
def test_mlp_run_early_scores_find_noisy_labels(mlp_run):
    """MNIST-5k MLP, 10% symmetric noise, ~all noisy labels memorised by the end of training."""
    run = mlp_run
    assert run.metrics()["noisy_accuracy"][-1] > 0.95
    res = scores.scores(run, methods="final_loss,el2n,grand,aum,confidence,forgetting")
    values = {name: res[name].values for name in res.data_vars}
    table = detect.detection_table(values, run.is_noisy, {n: scores.SCORES[n].direction for n in values})
    auroc = dict(zip(table["names"], table["values"][:, 0]))
    ap = dict(zip(table["names"], table["values"][:, 1]))
    for name in ("el2n", "grand", "aum", "confidence"):
        assert auroc[name] > 0.95, (name, auroc)
        assert ap[name] > ap["final_loss"] + 0.1, (name, ap)   # memorisation hides noise from the final loss
    assert auroc["forgetting"] > 0.6
