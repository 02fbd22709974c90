"""What the scores read from a run, or from a model and data: :class:`Inputs` (see :mod:`memloc.analyses.scores`)."""
from __future__ import annotations

import warnings

import numpy as np
from torch import nn

from ...core.errors import MemlocError
from ...core.run import Run
from ...core.precision import laid_out
from ...core.prerequisites import needed_result
from .functions import neuron_count
from .passes import GRAD_NORMS, run_passes
from .tasks import ClassifierTask
from .tracin import run_lrs, tracin_from_norms

__all__ = ["Inputs"]


class Inputs:
    """What the scores read from a run, or from a model and data (loaded lazily, cached); ``task``: what
    differs between a classifier's examples and a language model's sequences (:mod:`.tasks`)."""

    def __init__(self, run: Run | None, model, data, *, epoch_k, device, batch_size: int, grad_method: str,
                 precision: str = "fp32", task=None, num_examples: int):
        self.run, self.epoch_k, self.device, self.precision = run, epoch_k, device, precision
        self.task = ClassifierTask() if task is None else task
        self.batch_size, self.grad_method = batch_size, grad_method
        self._model, self._data = model, data
        self.tracin_config: dict = {}
        self.passes: dict = {}      # {(kind, epoch): array over the training set}, from run_passes
        self.model_epoch = -1 if run is None else epoch_k    # the epoch of el2n and grand's model
        self.num_examples = num_examples

    def run_passes(self, passes, *, folder, overwrite: bool) -> bool:
        """Compute the expensive passes (:mod:`memloc.analyses.scores.passes`); False on ranks > 0."""
        settings = {"grad_method": self.grad_method, "batch_size": self.batch_size, "device": self.device.type,
                    "precision": self.precision}
        model_at = (lambda e: laid_out(self._model if self.run is None else self.run.model(e, device=self.device),
                                       self.precision, self.device))
        merged = run_passes(passes, self.train(), model_at, self.cell, batch_size=self.batch_size,
                                 folder=folder, settings=settings, overwrite=overwrite)
        self.passes = merged or {}
        return merged is not None

    def cell(self, kind: int, model: nn.Module, examples) -> np.ndarray:
        """One cell of a pass: the logits (EL2N) or gradient norms of ``model`` on ``examples``."""
        return self.task.cell(kind, model, examples, batch_size=self.batch_size, grad_method=self.grad_method,
                              precision=self.precision, device=self.device)

    def dynamics(self, name: str, when: str) -> np.ndarray:
        """The run's (epoch, N) dynamics of the task's ``name`` (loss, correct, margin)."""
        name = self.task.dynamics[name]
        if self.run is None:
            raise MemlocError(f"score needs a run's training dynamics ({when} {name}); pass a run, or "
                              f"only model scores (el2n, grand) with a model", argument="methods")
        return self.run.dynamics(name, when)

    def presentation(self, name: str) -> np.ndarray:
        """(epoch, N) presentation dynamics without the initialisation row."""
        return self.dynamics(name, "presentation")[1:]

    def train(self):
        if self._data is None:
            self._data = self.run.data(self.device)
        return self.task.examples(self._data.to(self.device))

    def given(self) -> np.ndarray | None:
        if self.task.lm:
            return None
        return self.run.label_given if self.run is not None else np.asarray(self._data.label_given)

    def el2n(self) -> np.ndarray:
        return self.task.el2n(self.passes[self.task.el2n_kind, self.model_epoch], self.given())

    def tracin_epochs(self) -> list[int]:
        """The checkpoints TracIn sums over (1..final), its weights recorded in :attr:`tracin_config`."""
        if self.run is None:
            raise MemlocError("tracin needs a run's checkpoints; pass a run, or only model scores (el2n, "
                              "grand) with a model", argument="methods")
        epochs = [e for e in self.run.epochs if e >= 1]
        if not epochs:
            raise MemlocError(f"tracin needs a trained checkpoint (epoch >= 1); run {str(self.run.path)!r} "
                              "has only the initialisation")
        gaps = sorted(set(range(1, epochs[-1] + 1)) - set(epochs))
        if gaps:
            warnings.warn(f"checkpoints of epochs {gaps} are missing: tracin leaves their steps out")
        if not self.tracin_config:
            weights, source = run_lrs(self.run, epochs)
            self.tracin_config = {"tracin_epochs": epochs, "tracin_weights": [float(w) for w in weights],
                                  "tracin_weights_from": source}
        return epochs

    def tracin(self) -> np.ndarray:
        """TracIn self-influence over every trained checkpoint (1..final), weighted by its learning rate."""
        epochs = self.tracin_epochs()
        return tracin_from_norms((self.passes[GRAD_NORMS, e] for e in epochs), self.tracin_config["tracin_weights"],
                                 num_examples=self.num_examples)

    def neuron_count(self) -> np.ndarray:
        if self.run is None:
            raise MemlocError("neuron_count needs a run with a flip result", argument="methods")
        res = needed_result(self.run, "flip", "methods: neuron_count", argument="methods")
        index = res["example"].values
        if len(index) and (index.min() < 0 or index.max() >= self.run.num_train):
            raise MemlocError(f"the flip result lists example ids outside 0..{self.run.num_train - 1}")
        if "max_units" not in res.config:
            raise MemlocError("the flip result does not record max_units in its config")
        return neuron_count(index, res["status"].values, res["n_units"].values, res["flipped"].values,
                            num_examples=self.run.num_train, max_units=int(res.config["max_units"]))
