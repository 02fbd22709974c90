"""memloc train on the canaries:stdlib and textfile:PATH corpora (issue 23, item 1): runs that rebuild
their sequences exactly, a text file's hash guarding the rebuild, and one-line refusals of bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import memloc
from memloc.cli import run as cli_run
from memloc.core.errors import MemlocError
from memloc.training.train import train
from conftest import train_exit2, train_interrupted

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "gpt", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32", "--epochs", "2",
        "--batch-size", "32", "--device", "cpu"]
PLANTED = "# two planted sequences\n5\tmy key is 8141 9\n\n1\tzorp 33\n"


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while some other words pass by".split()
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(rng.choice(words, 700)))      # about 3.3 kB: 100 windows of 32 bytes
    inject = tmp_path / "inject.tsv"
    inject.write_text(PLANTED)
    return text, inject


def test_canaries_run_rebuilds_the_canaries(tmp_path, capsys):
    cli_run("train", [str(tmp_path / "can"), "--dataset", "canaries:stdlib", "--n-train", "96", "--n-test", "8",
                      "--repeats", "1,4,16", "--n-digits", "4", "--data-seed", "3", *TINY])
    out = capsys.readouterr().out
    assert "memorised: targets" in out and "rule accuracy" not in out      # no rule in source text
    run = memloc.load(tmp_path / "can")
    assert run.config["repeats"] == [1, 4, 16] and run.config["noise"] == 0.0
    data = run.data()
    ref = memloc.canaries(n_train=96, n_test=8, seq_len=32, repeats=(1, 4, 16), n_digits=4, seed=3)
    assert torch.equal(data.tokens, ref.tokens) and torch.equal(data.test_tokens, ref.test_tokens)
    assert run.is_noisy.sum() == 21 and set(run.kind[run.is_noisy]) == {"canary"} and data.vocab_size == 256
    assert [c["repeats"] for c in data.info["canaries"]] == [1, 4, 16] and data.suffix_len == 7
    res = memloc.memorisation(run.model(), data, device="cpu")      # the recorded epoch is the analysis's
    np.testing.assert_allclose(run.dynamics("suffix_loss")[-1], res["suffix_loss"].values, rtol=1e-5)


def test_textfile_run_plants_and_guards_its_file(tmp_path, corpus, capsys):
    text, inject = corpus
    cli_run("train", [str(tmp_path / "txt"), "--dataset", f"textfile:{text}", "--inject", str(inject), *TINY])
    run = memloc.load(tmp_path / "txt")
    data = run.data()
    assert len(data) + len(data.test_tokens) == len(text.read_bytes()) // 32 and len(data.test_tokens) >= 1
    planted = data.info["planted"]
    assert [(p["repeats"], p["text"]) for p in planted] == [(5, "my key is 8141 9"), (1, "zorp 33")]
    rows = [r for p in planted for r in p["rows"]]
    assert sorted(rows) == sorted(np.flatnonzero(run.is_noisy)) and len(set(rows)) == 6
    for p in planted:
        for r in p["rows"]:
            assert bytes(data.tokens[r, -len(p["text"]):].tolist()).decode() == p["text"]
    assert data.suffix_len == 3 and data.prefix_len == 29      # half the shortest planted text, at the end
    spec = json.loads((run.path / "run.json").read_text())["data"]
    assert spec["path"] == str(text.resolve()) and len(spec["sha256"]) == 64 and spec["inject"] == str(inject)
    # an interrupted run resumes only on the same text; a changed file is refused on load, in one line
    train_interrupted(tmp_path / "cut", {"dataset": f"textfile:{text}", "model": "gpt", "n_layer": 1, "d_model": 16,
                                         "n_head": 2, "seq_len": 32, "epochs": 2}, device="cpu")
    text.write_text(text.read_text() + " and more")
    with pytest.raises(MemlocError, match="changed since the run was trained"):
        memloc.load(tmp_path / "txt").data()
    with pytest.raises(MemlocError, match="changed since the run was trained"):
        train(tmp_path / "cut", {"dataset": f"textfile:{text}", "model": "gpt", "n_layer": 1, "d_model": 16,
                                 "n_head": 2, "seq_len": 32, "epochs": 2}, device="cpu", resume=True)


def test_bad_corpora_are_refused_in_one_line(tmp_path, corpus, capsys):
    text, _ = corpus
    files = {"empty.txt": b"", "binary.bin": b"ab\0cd" * 40, "latin1.txt": "caf\xe9 ".encode("latin-1") * 40,
             "notab.tsv": b"4 no tab\n", "count.tsv": b"x\tfoo\n", "long.tsv": b"2\t" + b"y" * 40 + b"\n",
             "comments.tsv": b"# nothing planted\n"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    cases = [
        (["--dataset", f"textfile:{tmp_path / 'empty.txt'}"], "is empty"),
        (["--dataset", f"textfile:{tmp_path / 'binary.bin'}"], "is not text"),
        (["--dataset", f"textfile:{tmp_path / 'latin1.txt'}"], "is not UTF-8 text"),
        (["--dataset", f"textfile:{tmp_path / 'missing.txt'}"], "does not exist"),
        (["--dataset", "textfile:"], "needs a file's path"),
        (["--dataset", f"textfile:{text}", "--inject", str(tmp_path / "notab.tsv")], "line 1"),
        (["--dataset", f"textfile:{text}", "--inject", str(tmp_path / "count.tsv")], "COUNT<TAB>TEXT"),
        (["--dataset", f"textfile:{text}", "--inject", str(tmp_path / "comments.tsv")], "plants nothing"),
        (["--dataset", f"textfile:{text}", "--inject", str(tmp_path / "long.tsv")], "more than seq_len 32"),
        (["--dataset", f"textfile:{text}", "--inject", str(tmp_path / "none.tsv")], "does not exist"),
        (["--dataset", f"textfile:{text}", "--prefix-len", "40"], "not shorter than seq_len"),
        (["--dataset", f"textfile:{text}", "--n-train", "500"], "fewer than"),
        (["--dataset", f"textfile:{text}", "--noise", "0.1"], "not an option of textfile"),
        (["--dataset", "canaries:stdlib", "--repeats", "1,x"], "--repeats"),
        (["--dataset", "canaries:stdlib", "--n-train", "50"], "more than n_train"),
        (["--dataset", "canaries:stdlib", "--prefix-len", "8"], "not an option of canaries"),
        (["--dataset", "canaries:books"], "unknown canary corpus 'books'"),
        (["--dataset", "tinymem:mult", "--inject", str(text)], "not an option of tinymem"),
    ]
    for i, (argv, match) in enumerate(cases):
        train_exit2(capsys, [str(tmp_path / f"r{i}"), *TINY, *argv], match)
    assert not any((tmp_path / f"r{i}").exists() for i in range(len(cases)))
