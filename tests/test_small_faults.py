"""Small faults a new user meets (issues 25 and 26): numpy's numbers taken as the numbers they are, a missing
input result named with the command that makes it, the demo kept out of folders that are not its own,
fallbacks recorded."""
import json

import numpy as np
import pytest
import torch

import memloc
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
