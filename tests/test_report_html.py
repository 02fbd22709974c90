"""report.html: one self-contained page (figures embedded, each with how to read it, findings first,
thumbnails of the most suspicious images), and the report defects of issue 26 (settings table of nulls, cleanlab named without it, a NaN detect
table, stacked log-scale histograms, a cut accuracy axis with one-seed error bars)."""
import base64
import re
import os
import shutil
import subprocess

import numpy as np
import pytest
import xarray as xr

import memloc
from memloc.core.results import Result

from conftest import results_free_copy

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(tiny_run, tmp_path_factory):
    """A copy of the tiny run with a few results and its report."""
    tmp = tmp_path_factory.mktemp("html")
    run = results_free_copy(tiny_run, tmp / "run")
    memloc.rewind(run, checkpoints="0,final", device="cpu", save=True)
    memloc.retrain(run, epochs=1, device="cpu", save=True)
    memloc.find_label_issues(run, checkpoint=1, device="cpu", save=True)
    md = memloc.report(run, tmp / "report")
    return run, md


def test_report_html_is_self_contained_and_every_image_is_a_png(reported):
    run, md = reported
    page = md.with_name("report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "an outside reference"
    assert "<script" not in page and "<link" not in page
    images = re.findall(r"<img [^>]*>", page)
    assert len(images) == len(list(md.parent.glob("*.png"))) >= 4       # training, rewind, retrain, issues
    for img in images:
        src = re.search(r'src="([^"]*)"', img).group(1)
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1], validate=True)[:8] == PNG
    figures = re.findall(r"<figure>.*?</figure>", page, re.S)
    assert len(figures) == len(images) and all("<figcaption>How to read:" in f for f in figures)


def test_the_most_suspicious_images_are_shown_with_given_and_predicted_labels(reported):
    from PIL import Image
    run, md = reported
    assert "![most suspicious examples](issues_examples.png)" in md.read_text()
    width, height = Image.open(md.with_name("issues_examples.png")).size
    assert width > 5 * height           # one row of thumbnails


def test_report_opens_with_findings_and_lists_only_the_settings_that_are_set(reported):
    run, md = reported
    text = md.read_text()
    first = text.index("## Findings")
    assert first < text.index("## Training") < text.index("## Settings")
    findings = text[first:text.index("## Training")]
    assert "**Training**" in findings and "retraining" in findings and "Labels that look wrong" in findings
    noisy = int(run.is_noisy.sum())
    assert f"{noisy} of {run.num_train} training labels are wrong" in findings
    settings = text[text.index("## Settings"):]
    assert "null" not in settings and "| false |" not in settings and '"digits"' in settings
    page = md.with_name("report.html").read_text()
    assert '<ul class="findings">' in page and page.index("Findings") < page.index("Training</h2>")


def test_a_finding_whose_result_is_absent_is_left_out(tiny_run, tmp_path):
    run = results_free_copy(tiny_run, tmp_path / "run")
    text = memloc.report(run, tmp_path / "report").read_text()
    findings = text[text.index("## Findings"):text.index("## Training")]
    assert "**Training**" in findings and "retraining" not in findings and "Fixing" not in findings


def _clean(flags, seeds):
    k, s = len(flags), len(seeds)
    ds = xr.Dataset({"test_accuracy": (("flags", "seed"), np.full((k, s), 0.9) + 0.01 * np.arange(k)[:, None]),
                     "flagged": ("flags", np.arange(k) * 10), "precision": ("flags", np.full(k, np.nan)),
                     "recall": ("flags", np.full(k, np.nan)), "noise_left": ("flags", np.full(k, np.nan))},
                    coords={"flags": flags, "seed": seeds})
    return Result("clean", ds, config={"relabel": False})


def test_clean_section_names_cleanlab_only_when_it_ran_and_draws_no_error_bar_from_one_seed(tmp_path):
    from memloc.actions.clean import plot_clean
    text = plot_clean(_clean(["all", "memloc"], [0]), tmp_path)
    assert "is the baseline" not in text and "one seed: no error bars" in text
    text = plot_clean(_clean(["all", "memloc", "cleanlab"], [0, 1]), tmp_path)
    assert "cleanlab (K-fold cross-validation, same recipe) is the baseline" in text
    assert "standard errors over the 2 seeds" in text


def test_detect_section_shows_no_row_of_nan(tmp_path):
    from memloc.analyses.detect import plot_detect
    values = np.array([[0.9, 0.8, 0.7], [np.nan, np.nan, np.nan]])
    ds = xr.Dataset({"values": (("score", "metric"), values), "direction": ("score", [1, -1]),
                     "size": ("score", [100, 20]), "noisy": ("score", [10, 0]), "base_rate": ("score", [0.1, 0.0])},
                    coords={"score": ["el2n", "neuron_count"], "metric": ["auroc", "ap", "prec_at_k"]})
    text = plot_detect(Result("detect", ds), tmp_path)
    assert "| el2n |" in text and "| neuron_count |" not in text and "- | - | -" not in text
    assert "`neuron_count` (20 examples, 0 noisy)" in text


def test_report_html_renders_in_a_headless_browser(reported, tmp_path):
    """The page loads without network in a real browser and the screenshot is not blank.

    Skipped where Debian's chromium is missing, except in CI (``CI`` set), where ``.ci/run`` installs it:
    there a missing browser fails instead of passing silently."""
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("CI without chromium on PATH: .ci/run installs it (apt-get install chromium)")
        pytest.skip("needs Debian's chromium on PATH (apt-get install chromium)")
    from PIL import Image
    run, md = reported
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,2000", md.with_name("report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20, "a blank page"
    assert (pixels < 128).mean() > 0.01        # text and figures, not a white page
