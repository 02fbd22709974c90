"""Evaluating a model with dropout layers in each mode (and recalibrating its BatchNorm first)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from ..errors import MemlocError
from ..evaluate import SUBSETS, accuracies
from .insert import require_dropout_layers, auto_as_test, example_ids, set_mode

__all__ = ["EVAL_MODES", "recalibrate_norms", "evaluate_modes"]

EVAL_MODES = ("train", "test", "drop")


class _WithIds:
    """An ExampleSet whose batches are evaluated with their example ids bound to ``model``."""

    def __init__(self, examples, model):
        self.examples, self.model = examples, model

    def batches(self, batch_size, **kw):
        for x, y, idx in self.examples.batches(batch_size, **kw):
            with example_ids(self.model, idx):
                yield x, y, idx   # the consumer's forward runs while the ids are bound


def recalibrate_norms(model: nn.Module, examples, *, batch_size: int = 1024) -> int:
    """Re-estimate every BatchNorm's running statistics from ``examples``' inputs, in place.

    The statistics of a model trained with dropout layers were collected under the training
    masks; in ``test`` or ``drop`` mode the activations reaching each norm are distributed
    differently. This resets the running mean / variance of every batch norm and replaces them
    by the average over the batches of ``examples`` (forward passes only, labels unused, every
    other module in eval mode and the dropout layers in their current mode, ``auto`` acting as
    ``test``: :func:`auto_as_test`). Returns the number
    of norms recalibrated (0: nothing to do).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    flags = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None          # cumulative average over the batches
            m.train()
        with torch.no_grad(), auto_as_test(model):
            for x, _, _ in examples.batches(batch_size):
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, t in flags.items():
            m.train(t)
    return len(norms)


def evaluate_modes(model: nn.Module, data, *, modes=EVAL_MODES, batch_size: int = 1024,
                   recalibrate_bn: bool = False) -> np.ndarray:
    """Accuracies (len(modes), len(SUBSETS)) of ``model`` (eval mode) with its dropout layers in each mode.

    Subsets are :data:`memloc.core.evaluate.SUBSETS` (clean, noisy w.r.t. given labels, noisy w.r.t. true
    labels, test). In ``train`` mode every training example is seen through its own training
    mask (what the network memorised); the test column is NaN there (test examples have no
    masks). With ``recalibrate_bn`` the ``test`` and ``drop`` modes are evaluated on a copy whose
    BatchNorm statistics were re-estimated in that mode from the training inputs
    (:func:`recalibrate_norms`; ``train`` mode keeps the statistics training collected). The
    layers' modes (and ``model``) are left as they were.
    """
    layers = require_dropout_layers(model)
    old = {name: layer.mode for name, layer in layers.items()}
    unknown = [mode for mode in modes if mode not in EVAL_MODES]
    if unknown:
        raise MemlocError(f"unknown evaluation mode {unknown[0]!r}; valid: {', '.join(EVAL_MODES)}")
    out = np.full((len(modes), len(SUBSETS)), np.nan)
    try:
        for i, mode in enumerate(modes):
            set_mode(model, mode)
            if mode == "train":
                no_test = data.test.subset(np.zeros(len(data.test), bool))
                acc = accuracies(model, dataclasses.replace(data, train=_WithIds(data.train, model), test=no_test),
                                 batch_size=batch_size)
            elif recalibrate_bn:
                work = copy.deepcopy(model)
                recalibrate_norms(work, data.train, batch_size=batch_size)
                acc = accuracies(work, data, batch_size=batch_size)
            else:
                acc = accuracies(model, data, batch_size=batch_size)
            out[i] = [acc[s] for s in SUBSETS]
    finally:
        for name, m in old.items():
            layers[name].mode = m
    return out
