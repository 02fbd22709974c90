"""One vocabulary for every public function (CONTRIBUTING.md, "One vocabulary").

A ratchet: the deviations still in the library are listed in KNOWN, and the test fails both on a new
deviation and on a listed one that was fixed (remove it from the list then), so the vocabulary can
only converge. Also checked: options are keyword-only, every analysis takes ``device``, and a
function that returns nothing on ranks > 0 says so in its annotation (``Result | None``).
"""
from __future__ import annotations

import inspect
import re

import memloc

#: the public functions that analyse a run or a model (first argument: what is analysed)
ANALYSES = ("gradients", "rewind", "retrain", "flip", "scores", "detect", "find_label_issues", "importance",
            "evaluate_dropout", "score_agreement", "prune", "clean", "jtt", "unlearn", "forgetting_order", "report", "memorisation")
#: a synonym -> the vocabulary's word
SYNONYMS = {"run": "source", "runs": "source", "run_dir": "source", "results": "source",
            "checkpoint_k": "checkpoint", "id_epoch": "checkpoint", "grand_epoch": "checkpoint", "reset_to": "checkpoint",
            "names": "methods", "by": "methods", "method": "methods", "grad_method": "methods", "protect": "methods",
            "orders": "methods", "seed": "seeds", "resume_dir": "resume"}
#: evaluation passes take eval_batch_size; batch_size is the optimiser's (training) batch
EVAL_BATCH = {"gradients", "scores", "find_label_issues", "importance", "jtt"}
#: analyses that run a model but do not take ``precision`` yet
NO_PRECISION = {"gradients", "find_label_issues", "importance", "evaluate_dropout", "prune", "clean", "jtt",
                "unlearn", "forgetting_order"}

KNOWN = {
    ("gradients", "batch_size"), ("gradients", "resume_dir"),
    ("rewind", "resume_dir"),
    ("retrain", "reset_to"), ("retrain", "seed"), ("retrain", "resume_dir"),
    ("flip", "seed"), ("flip", "resume_dir"),
    ("scores", "names"), ("scores", "checkpoint_k"), ("scores", "grad_method"), ("scores", "batch_size"),
    ("scores", "resume_dir"),
    ("detect", "names"),
    ("find_label_issues", "runs"), ("find_label_issues", "by"), ("find_label_issues", "checkpoint_k"),
    ("find_label_issues", "batch_size"),
    ("importance", "method"), ("importance", "batch_size"),
    ("score_agreement", "results"), ("score_agreement", "names"),
    ("prune", "run"), ("prune", "by"), ("prune", "checkpoint_k"), ("prune", "grand_epoch"),
    ("clean", "run"), ("clean", "by"),
    ("jtt", "run"), ("jtt", "id_epoch"), ("jtt", "batch_size"),
    ("unlearn", "run"),
    ("forgetting_order", "run"), ("forgetting_order", "orders"), ("forgetting_order", "protect"),
    ("forgetting_order", "seed"),
} | {(name, "precision") for name in NO_PRECISION}


def deviations() -> set[tuple[str, str]]:
    found = set()
    for name in ANALYSES:
        params = inspect.signature(getattr(memloc, name)).parameters
        first = next(iter(params))
        for p in params:
            if p in SYNONYMS and (SYNONYMS[p] != "source" or p == first):
                found.add((name, p))
        if "batch_size" in params and name in EVAL_BATCH:
            found.add((name, "batch_size"))
        if name not in ("detect", "score_agreement", "report") and "precision" not in params:
            found.add((name, "precision"))
    return found


def test_the_vocabulary_only_converges():
    found = deviations()
    new, fixed = sorted(found - KNOWN), sorted(KNOWN - found)
    assert not new, f"new arguments outside the vocabulary (see CONTRIBUTING.md): {new}"
    assert not fixed, f"fixed, remove from KNOWN: {fixed}"


def test_options_are_keyword_only_and_analyses_take_a_device():
    for name in ANALYSES:
        params = list(inspect.signature(getattr(memloc, name)).parameters.values())
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert positional[0] in ("source", *[k for k, v in SYNONYMS.items() if v == "source"]), name
        assert len(positional) <= 2, f"{name}: options must be keyword-only, got positional {positional}"
        if name not in ("detect", "score_agreement", "report"):
            assert "device" in {p.name for p in params}, f"{name} computes but takes no device"


def test_return_annotations_tell_the_truth_under_torchrun():
    for name in ANALYSES:
        fn = inspect.unwrap(getattr(memloc, name))
        body = inspect.getsource(fn)
        if re.search(r"world\(\)\[0\] > 0|rank > 0", body):
            assert "None" in str(inspect.signature(fn).return_annotation), \
                f"{name} returns None on ranks > 0 but is annotated {inspect.signature(fn).return_annotation}"
