"""Progress when the output is not a terminal: lines with the elapsed time instead of hidden tqdm bars."""
from __future__ import annotations

import re

from memloc.core.lines import Lines, interval
from memloc.core.runtime import progress


def test_lines_every_interval_and_a_closing_line(monkeypatch, capsys):
    monkeypatch.setenv("MEMLOC_PROGRESS_SECONDS", "0")
    bar = progress(range(2, 5), desc="train mlp", unit="epoch", initial=2)
    assert isinstance(bar, Lines)                       # pytest's captured stderr is no terminal
    assert list(bar) == [2, 3, 4]
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == ["train mlp: 3/5 epoch (0 s)", "train mlp: 4/5 epoch (0 s)", "train mlp: 5/5 epoch (0 s)"]
    assert err[3] == "train mlp: done 5 epoch in 0 s" and len(err) == 4


def test_short_work_stays_silent_and_postfix_is_shown(monkeypatch, capsys):
    monkeypatch.setenv("MEMLOC_PROGRESS_SECONDS", "3600")
    with progress(total=3, desc="flip", unit="search") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MEMLOC_PROGRESS_SECONDS", "not a number")
    assert interval() == 30.0
    monkeypatch.setenv("MEMLOC_PROGRESS_SECONDS", "0")
    bar = progress(total=None, desc="scores", unit="block")
    bar.set_postfix(noisy="0.5")
    bar.update()
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["scores: 1 block (0 s), noisy=0.5", "scores: done 1 block in 0 s"]


def test_training_written_to_a_file_shows_its_epochs(tmp_path, monkeypatch, capsys):
    """The train command with stderr not a terminal (pytest captures it, as a log file would): a line per
    epoch (interval 0) with the elapsed time and the epoch's measures, then the closing line."""
    from memloc.cli import run as cli_run
    monkeypatch.setenv("MEMLOC_PROGRESS_SECONDS", "0")
    cli_run("train", [str(tmp_path / "run"), "--dataset", "digits", "--model", "mlp", "--epochs", "2",
                      "--device", "cpu"])
    text = capsys.readouterr().err
    epochs = re.findall(r"^train mlp: (\d)/2 epoch \(\d+ s\), train=", text, re.M)
    assert epochs == ["1", "2"] and "train mlp: done 2 epoch in" in text
