"""memloc report on language-model runs (issue 23, item 6): every run kind (tinymem, canaries:stdlib,
textfile: with planted sequences, an HF GPT-2-config model recorded by SequenceRecorder) gets its
report, with memorisation over training by kind, planted sequences by insertion count (exposure for
canaries) and a section for each LM result that exists; the rule accuracy is recorded only for TinyMem."""
from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import torch

import memloc
from memloc.cli import run as cli_run
from memloc.training.train import train

from conftest import results_free_copy
from test_lm_corpora import PLANTED
from test_lm_recorder import user_loop

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = {"model": "gpt", "n_layer": 1, "d_model": 16, "n_head": 2, "epochs": 2, "batch_size": 32, "lr": 1e-2}


def _kind_rows(text: str) -> dict[str, list[str]]:
    section = text[text.index("## Training (language model)"):]
    return {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| "))}


def _self_contained(md) -> None:
    page = md.with_name("report.html").read_text()
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]*)"', page)
    assert len(images) == len(list(md.parent.glob("*.png"))) == md.read_text().count("](")
    assert all(base64.b64decode(i)[:8] == PNG for i in images)
    assert page.count("<figcaption>How to read:") == len(images)


@pytest.fixture(scope="module")
def lm_reported(memorising_lm, tmp_path_factory):
    """The memorising TinyMem run with rewind, mitigation and localisation results, and its report."""
    tmp = tmp_path_factory.mktemp("lmreport")
    run = results_free_copy(memorising_lm, tmp / "run")
    memloc.rewind(run, checkpoints="0,final", device="cpu", save=True)
    memloc.mitigate(run, methods=("random", "greedy"), device="cpu", save=True)
    memloc.localise_neurons(run, methods=("zero_out", "random"), device="cpu", save=True)
    cli_run("memorisation", [str(run.path), "--checkpoint", "5", "--device", "cpu"])
    cli_run("report", [str(run.path)])            # the command crashed on an LM run (KeyError 'clean_accuracy')
    return run, run.path / "report" / "report.md"


def test_report_of_a_tinymem_run_shows_memorisation_by_kind(lm_reported):
    run, md = lm_reported
    text = md.read_text()
    assert text.index("## Findings") < text.index("## Training (language model)") < text.index("## Settings")
    m, rows = run.metrics(), _kind_rows(text)
    for kind in ("clean", "noisy", "duplicate"):        # the recorded per-epoch metric, read back from the table
        label = kind if kind == "clean" else f"{kind} (target)"
        assert int(rows[label][0]) == int((run.kind == kind).sum())
        assert float(rows[label][1]) == pytest.approx(100 * m[f"{kind}_memorised"][-1], abs=0.05)
    assert "backdoor (target)" not in rows and "canary (target)" not in rows       # kinds the run does not have
    assert float(rows["held out"][1]) == pytest.approx(100 * m["test_rule_accuracy"][-1], abs=0.05)
    assert 0 < m["noisy_memorised"][-1] < 1 or 0 < m["duplicate_memorised"][-1]     # the fixture memorises
    findings = text[text.index("## Findings"):text.index("## Training")]
    targets = int(run.is_noisy.sum())
    assert f"{targets} of {run.num_train} training sequences are memorisation targets" in findings
    assert "held-out rule accuracy" in findings and "wrong labels" not in findings and "Rewinding" in findings


def test_each_lm_result_gets_its_section_only_when_it_exists(lm_reported):
    run, md = lm_reported
    text = md.read_text()
    for heading in ("## Layer rewinding", "## Removing memorised sequences (mitigation)", "## Memorised sequences at one",
                    "## Neurons holding memorised sequences"):
        assert heading in text
    for absent in ("## Known-answer benchmark", "## Deleting memorised sequences", "## Layer retraining",
                   "### Planted sequences"):
        assert absent not in text
    assert "targets reproduced" in text and "noisy train (given label)" not in text    # the LM's subset words
    _self_contained(md)


def test_report_of_a_canaries_run_plots_exposure_against_insertions(tmp_path):
    run = train(tmp_path / "can", {**SMALL, "dataset": "canaries:stdlib", "n_train": 40, "n_test": 4, "seq_len": 24,
                                   "repeats": [1, 3, 9], "n_digits": 2}, device="cpu")
    assert "test_rule_accuracy" not in run.metrics() and "test_accuracy" in run.metrics()   # no rule in source text
    text = memloc.report(run, tmp_path / "report").read_text()
    assert "rule" not in text[text.index("## Findings"):text.index("## Settings")]
    section = text[text.index("### Planted sequences"):text.index("## Settings")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    assert [r[:2] for r in rows[1:]] == [["alice", "1"], ["bob", "3"], ["carol", "9"]]
    data, model = run.data(), run.model()
    for i, (row, c) in enumerate(zip(rows[1:], data.info["canaries"])):     # exact exposure: 100 candidates
        reproduced = run.dynamics("memorised")[-1][c["rows"]].mean()
        assert float(row[2]) == pytest.approx(100 * reproduced, abs=0.05)
        prefix = torch.cat([data.test_tokens[i, :data.prefix_len - len(c["prefix_text"])],
                            torch.tensor(list(c["prefix_text"].encode()))])
        ref = memloc.exposure(model, prefix, torch.tensor(list(c["secret"].encode())),
                              memloc.digit_space(2, digits=range(48, 58), separator=32), device="cpu")
        assert float(row[3]) == pytest.approx(ref, abs=0.05) and 0 <= ref <= np.log2(100)
    _self_contained(tmp_path / "report" / "report.md")


def test_report_of_a_textfile_run_with_planted_sequences(tmp_path):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while some other words pass by".split()
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(words, 400)))
    (tmp_path / "inject.tsv").write_text(PLANTED)
    run = train(tmp_path / "txt", {**SMALL, "dataset": f"textfile:{tmp_path / 'corpus.txt'}",
                                   "inject": str(tmp_path / "inject.tsv"), "seq_len": 32}, device="cpu")
    assert "test_rule_accuracy" not in run.metrics()
    text = memloc.report(run, tmp_path / "report").read_text()
    section = text[text.index("### Planted sequences"):text.index("## Settings")]
    assert "| zorp 33 | 1 |" in section and "| my key is 8141 9 | 5 |" in section and "exposure" not in section
    assert "(target)" in text and "rule" not in text[:text.index("## Settings")]


def test_report_of_an_hf_model_recorded_in_a_user_loop(tmp_path):
    data = memloc.tinymem("mult", n_train=12, n_test=4, seq_len=16, suffix_len=4, noise=0.5)
    user_loop(tmp_path / "loop", data, epochs=2)
    run = memloc.load(tmp_path / "loop")
    md = memloc.report(run)
    rows = _kind_rows(md.read_text())
    assert int(rows["noisy (target)"][0]) == int(data.is_memorised_target.sum())
    assert float(rows["held out"][1]) == pytest.approx(100 * run.metrics()["test_rule_accuracy"][-1], abs=0.05)
    settings = md.read_text().split("## Settings", 1)[1]        # what the recorder knew (its config is empty)
    assert '| model | "GPT2LMHeadModel" |' in settings and '| data | "tinymem-mult" |' in settings
    _self_contained(md)


def test_memorisation_command_equals_the_recorded_epoch_and_gets_its_section(lm_reported):
    run, md = lm_reported
    res = run.result("memorisation")
    assert res.config["checkpoint"] == 5 and res.config["split"] == "train"
    np.testing.assert_array_equal(res["memorised"].values, run.dynamics("memorised")[5] == 1)   # the recorder's pass
    np.testing.assert_allclose(res["suffix_loss"].values, run.dynamics("suffix_loss")[5], rtol=1e-5)
    np.testing.assert_array_equal(res["kind"].values, run.kind)
    text = md.read_text()
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.strip("|").split("|")] for line in
            text[text.index("## Memorised sequences at one checkpoint"):].splitlines() if line.startswith("| "))}
    assert float(rows["noisy"][1]) == pytest.approx(100 * res["memorised"].values[run.kind == "noisy"].mean(), abs=0.05)


@pytest.mark.parametrize("argv, match", [(["--checkpoint", "99"], "no checkpoint for epoch 99"),
                                         (["--split", "dev"], "invalid choice")])
def test_memorisation_command_refuses_bad_input_in_one_line(memorising_lm, argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        cli_run("memorisation", [str(memorising_lm.path), *argv, "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and len(err.strip().splitlines()) <= 2, err


def test_memorisation_of_a_classifier_run_is_one_error(tiny_run):
    with pytest.raises(memloc.MemlocError, match="not a language-model run"):
        memloc.memorisation(tiny_run, device="cpu")


def test_layer_captions_name_targets_and_other_sequences(lm_reported, tmp_path):
    """On a language model's run the layer analyses' sections say memorised targets / other sequences, never
    noisy / clean (without a language model's run the sections keep an image run's words)."""
    from memloc.analyses.gradients import plot_gradients
    from memloc.analyses.retrain import plot_retrain
    run, md = lm_reported
    text = md.read_text()
    rewind = text[text.index("## Layer rewinding"):]
    grads = memloc.gradients(run, checkpoints="final", layers="head", device="cpu")
    sections = {"rewind": rewind[:rewind.index("\n## ")], "gradients": plot_gradients(grads, tmp_path, run),
                "retrain": plot_retrain(memloc.retrain(run, epochs=1, layers="head", device="cpu"), tmp_path, run)}
    for name, section in sections.items():
        prose = "\n".join(line for line in section.splitlines() if not line.startswith("|"))   # not the tables
        assert "memorised targets" in prose and "other sequences" in prose, name
        assert not re.search(r"\b(noisy|clean|wrong)", prose), name
    image = plot_gradients(grads, tmp_path, None)
    assert "noisy examples" in image and "memorised targets" not in image
