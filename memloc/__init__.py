"""memloc: where in a network are mislabeled (memorised) training examples stored?

The public face. Every analysis takes a run (:func:`load`) or a model plus data, keyword-only
options, and returns a :class:`Result` (an ``xarray.Dataset`` with a schema; ``.save(path)``).

Nothing is imported until it is used (PEP 562): ``import memloc`` costs no more than importing
the standard library, and ``memloc.rewind`` imports the rewind analysis (and torch) on first use.
The package's layers, lowest first (imports only run downwards; ``tests/test_layout.py``):

``core`` (runs, data, models, units, results) < ``scale`` (torch.distributed, resumable parts,
DDP, prefix reuse) < ``training`` < ``analyses`` < ``actions`` < ``reporting`` < ``cli`` < this face
and the ``python -m memloc.<command>`` entry files beside it.
"""
from __future__ import annotations

import importlib

from .core import __version__

#: public name -> the module that defines it (loaded on first access)
_FACE = {
    # runs, data and models
    "load": "memloc.core.run", "Run": "memloc.core.run", "Recorder": "memloc.core.recorder",
    "SequenceRecorder": "memloc.core.sequence_recorder",
    "WithIds": "memloc.core.inputs", "Data": "memloc.core.data", "ExampleSet": "memloc.core.data",
    "make_data": "memloc.core.data", "register_data": "memloc.core.data", "register_model": "memloc.core.models",
    "StreamedSet": "memloc.core.stream", "set_streaming": "memloc.core.stream", "streaming": "memloc.core.stream",
    "Result": "memloc.core.results", "load_result": "memloc.core.results", "MemlocError": "memloc.core.errors",
    "SequenceSet": "memloc.core.sequences", "tinymem": "memloc.core.sequences", "follows_rule": "memloc.core.sequences",
    "canaries": "memloc.core.canaries", "TinyGPT": "memloc.core.lm", "hf_causal_lm": "memloc.core.lm",
    "lm_logits": "memloc.core.lm", "greedy_decode": "memloc.core.lm",
    "ExampleTiedDropout": "memloc.core.dropout", "insert_example_tied_dropout": "memloc.core.dropout",
    "set_mode": "memloc.core.dropout", "example_ids": "memloc.core.dropout",
    "insert_sinks": "memloc.core.dropout",
    # training
    "train": "memloc.training.train", "HFTrainerCallback": "memloc.training.hf_callback",
    "LightningCallback": "memloc.training.lightning_callback",
    # analyses
    "gradients": "memloc.analyses.gradients", "rewind": "memloc.analyses.rewind",
    "retrain": "memloc.analyses.retrain", "flip": "memloc.analyses.flip", "scores": "memloc.analyses.scores",
    "score_agreement": "memloc.analyses.agreement", "detect": "memloc.analyses.detect",
    "find_label_issues": "memloc.analyses.label_issues", "importance": "memloc.analyses.importance",
    "evaluate_dropout": "memloc.analyses.etd",
    "estimate_joint": "memloc.analyses.arrays", "estimate_noise_rate": "memloc.analyses.arrays",
    "rank_label_issues": "memloc.analyses.arrays", "find_label_issues_in_arrays": "memloc.analyses.arrays",
    "scores_from_arrays": "memloc.analyses.arrays",
    "memorisation": "memloc.analyses.memorisation", "memorisation_from_logits": "memloc.analyses.memorisation",
    "exposure": "memloc.analyses.exposure", "exposure_estimate": "memloc.analyses.exposure",
    "sequence_log_likelihood": "memloc.analyses.exposure", "CandidateSpace": "memloc.analyses.exposure",
    "digit_space": "memloc.analyses.exposure",
    "localise_neurons": "memloc.analyses.localise", "neuron_scores": "memloc.analyses.localise",
    "inj_benchmark": "memloc.analyses.inj", "del_benchmark": "memloc.analyses.deletion",
    "mitigate": "memloc.analyses.mitigation",
    # actions
    "prune": "memloc.actions.prune", "clean": "memloc.actions.clean", "jtt": "memloc.actions.jtt",
    "unlearn": "memloc.actions.unlearn", "forgetting_order": "memloc.actions.forgetting",
    # reporting
    "report": "memloc.reporting", "status": "memloc.reporting.status",
}

__all__ = ["__version__", *_FACE]


def __getattr__(name: str):
    home = _FACE.get(name)
    if home is None:
        raise AttributeError(f"module 'memloc' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value          # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_FACE))
