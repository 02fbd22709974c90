"""Example-tied dropout (Maini et al., ICML 2023, Section 5): direct memorisation into known units.

A fraction ``p_gen`` of the units of a layer (channels of NCHW outputs, features of 2-d / 3-d
token outputs) are **generalisation units**: always kept. The others are **memorisation units**:
each training example keeps its own fixed random subset of them, each unit with probability
``p_mem``. Dropping every memorisation unit after training (``drop`` mode) removes what the
network could only store in example-specific units -- mostly the memorised (mislabeled) examples.

Modes (:data:`MODES`, set with :func:`set_mode`):

* ``train`` -- per-example masks; kept units are **not** rescaled (as in the paper's code);
* ``test``  -- memorisation units scaled by ``p_mem`` (their expected mask value);
* ``drop``  -- memorisation units zeroed, generalisation units scaled by ``(p_gen + p_mem) / p_gen``;
* ``auto``  -- the default: ``train`` while the module is in training mode, else ``test``.

Generalisation units are the first ``floor(p_gen * C)`` units (as in the paper's code).
Masks are a counter-based hash (splitmix64 in int64 torch ops) of (seed, layer, example id,
unit index), computed on the activation's device at every forward: no per-dataset buffer,
memory independent of the dataset size, identical on every device by construction.

Example ids reach the layers without changing the model's forward signature::

    layers = insert_example_tied_dropout(model, after=["features.1", "classifier.1"],
                                         p_gen=0.4, p_mem=0.1)
    for x, y, idx in data.train.batches(128, shuffle=True):
        with example_ids(model, idx):
            loss = F.cross_entropy(model(x), y)
    set_mode(model, "drop")

:func:`memloc.evaluate_dropout` (:mod:`memloc.analyses.etd`; command ``python -m memloc dropout RUN``) evaluates a run trained with
``etd_after`` in train, test and drop mode and returns the ``"dropout"`` result: ``accuracy``
(mode, subset) (the train-mode test accuracy is NaN: test examples have no masks) and per-layer
``layer_kind``, ``units``, ``gen_units``. Models with BatchNorm collected its running statistics under the training masks;
``recalibrate_bn=True`` (:func:`recalibrate_norms`) re-estimates them in test and drop mode first
(on a width-16 ResNet-9 this turns a 4-8 point test-accuracy loss in drop mode into +-0.2).

Language models (:mod:`.sinks`, MemSinks): ``etd_after="mlp"`` puts the layers on every MLP's hidden
neurons, each sequence id keeping its own sinks; the result then holds the memorised shares and
held-out accuracies of :data:`memloc.core.schemas.LM_SUBSETS` per mode.
"""
from .evaluate import EVAL_MODES, evaluate_modes, recalibrate_norms
from .insert import (auto_as_test, dropout_layers, example_ids, insert_example_tied_dropout,
                     remove_example_tied_dropout, require_dropout_layers, set_mode)
from .layer import KINDS, MODES, ExampleTiedDropout, FixedSparseDropout, StandardDropout, example_masks
from .sinks import MLP_SITES, evaluate_sequence_modes, insert_sinks, mlp_sites, resolve_sites, sink_ids, sinks_spec

__all__ = ["ExampleTiedDropout", "StandardDropout", "FixedSparseDropout", "KINDS", "MODES", "EVAL_MODES",
           "insert_example_tied_dropout", "remove_example_tied_dropout", "dropout_layers", "set_mode",
           "auto_as_test", "example_ids", "example_masks", "evaluate_modes", "recalibrate_norms",
           "require_dropout_layers", "MLP_SITES", "mlp_sites", "resolve_sites", "sink_ids", "evaluate_sequence_modes",
           "insert_sinks", "sinks_spec"]
