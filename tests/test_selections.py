"""Selections are values in the library: example ids, boolean masks and {pool: count} mappings for
flip's examples, ints and ranges for checkpoints; each equals its text form (what the CLI parses)."""
from __future__ import annotations

import numpy as np
import pytest

import memloc
from memloc.analyses.flip import examples_spec, select_examples
from memloc.core.errors import MemlocError
from memloc.core.selection import parse_checkpoints


def test_example_values_equal_their_text_form():
    is_noisy = np.zeros(20, bool)
    is_noisy[[3, 7, 11]] = True
    assert examples_spec({"noisy": 2, "clean": "all"}, 20) == "noisy:2,clean:all"
    for value in ([11, 3, 5], np.array([11, 3, 5]), (11, 3, 5)):
        assert examples_spec(value, 20) == "ids:11,3,5"
        assert select_examples(value, is_noisy).tolist() == [11, 3, 5]
    assert select_examples(is_noisy, is_noisy).tolist() == [3, 7, 11]      # a mask
    np.testing.assert_array_equal(select_examples({"noisy": 2, "clean": 3}, is_noisy, seed=4),
                                  select_examples("noisy:2,clean:3", is_noisy, seed=4))


@pytest.mark.parametrize("value, message", [
    (np.ones(5, bool), "one entry per training example"), (np.array([1.5, 2.0]), "dtype float64"),
    (np.array([], dtype=np.int64), "selects no example"), (np.array([[1, 2]]), "shape"),
    ([3, 25], "must be in 0..19")])
def test_bad_example_values_are_one_line_errors(value, message):
    with pytest.raises(MemlocError, match=message) as e:
        select_examples(value, np.zeros(20, bool))
    assert e.value.argument == "examples" and "\n" not in str(e.value)


def test_checkpoint_values():
    available = list(range(0, 11))
    assert parse_checkpoints(5, available) == [5]
    assert parse_checkpoints(range(0, 11, 5), available) == parse_checkpoints("0-10:5", available) == [0, 5, 10]
    assert parse_checkpoints(np.int64(3), available) == [3]
    with pytest.raises(MemlocError, match="no checkpoint for epoch 12"):
        parse_checkpoints(12, available)


def test_flip_takes_example_ids_and_records_the_text_form(tiny_run):
    noisy = np.flatnonzero(tiny_run.is_noisy)[:2]
    by_value = memloc.flip(tiny_run, examples=noisy, max_units=5, device="cpu", resume=None)
    by_text = memloc.flip(tiny_run, examples="ids:" + ",".join(map(str, noisy)), max_units=5, device="cpu",
                          resume=None)
    assert by_value.equals(by_text)
    assert by_value.config["examples"] == "ids:" + ",".join(map(str, noisy))
    assert memloc.gradients(tiny_run, checkpoints=range(0, 3), device="cpu")["checkpoint"].values.tolist() == [0, 1, 2]
