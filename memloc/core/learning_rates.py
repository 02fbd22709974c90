"""The learning rate each epoch trained with, in ``run.h5``: ``/optimizer/lr`` (epoch,).

Row e holds the mean over epoch e's optimiser steps of the learning rate each step used
(``optimizer.param_groups[0]["lr"]`` just before the step): the weight TracIn gives the checkpoint of
epoch e (:func:`memloc.analyses.scores.checkpoint_lrs`). Row 0 (the initialisation: no step leads to it)
and epochs without a recorded step are NaN. Every writer (:class:`memloc.core.recorder.RunWriter`) keeps
the array; it is filled when the writer is given the optimiser (``optimizer=``, a step pre-hook: memloc's
trainers, :class:`memloc.Recorder` in your loop) or told each step's rate (``record_lr``: the Hugging Face
and Lightning callbacks). Runs written before it existed have no ``/optimizer/lr``: :func:`recorded_lrs`
gives None for them, and TracIn falls back to the schedule in the run's config.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import MemlocError
from .h5 import put

__all__ = ["LR_KEY", "LR_ATTRS", "StepRates", "create_lrs", "write_lr", "truncate_lrs", "recorded_lrs"]

LR_KEY = "optimizer/lr"
LR_ATTRS = {"units": "learning rate (optimizer.param_groups[0]['lr'])",
            "description": "mean over the epoch's optimiser steps of the learning rate each step used (the value "
                           "just before the step); NaN for epoch 0 (the initialisation) and epochs without a "
                           "recorded step"}


class StepRates:
    """The learning rates of the current epoch's optimiser steps: told one by one (:meth:`record`) or, after
    :meth:`start`, read from ``optimizer`` before each of its steps (a step pre-hook, removed by :meth:`close`)."""

    def __init__(self, optimizer=None):
        if optimizer is not None and (not hasattr(optimizer, "register_step_pre_hook")
                                      or not getattr(optimizer, "param_groups", None)):
            raise MemlocError(f"optimizer must be a torch.optim.Optimizer (got {type(optimizer).__name__}); for "
                              "another one call record_lr(lr) at every step", argument="optimizer")
        self.rates: list[float] = []
        self._optimizer, self._hook = optimizer, None

    def start(self) -> None:
        if self._optimizer is not None and self._hook is None:
            self._hook = self._optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: self.record(opt.param_groups[0]["lr"]))

    def record(self, lr) -> None:
        try:
            lr = float(lr.item() if hasattr(lr, "item") else lr)    # a tensor lr (torch allows one)
        except (TypeError, ValueError):
            raise MemlocError(f"record_lr: lr must be a number, got {type(lr).__name__}", argument="lr") from None
        if not math.isfinite(lr) or lr < 0:
            raise MemlocError(f"record_lr: lr must be finite and >= 0, got {lr}", argument="lr")
        self.rates.append(lr)

    def take(self) -> float:
        """The epoch's mean rate (NaN without a step), forgetting the epoch's steps."""
        out = float(np.mean(self.rates)) if self.rates else math.nan
        self.rates = []
        return out

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def create_lrs(f, rows: int = 0) -> None:
    """``/optimizer/lr`` in the open ``run.h5`` ``f``, its first ``rows`` rows NaN."""
    put(f.require_group("optimizer"), "lr", np.full(rows, np.nan), dims=["epoch"], maxshape=(None,), **LR_ATTRS)


def write_lr(f, epoch: int, lr: float) -> None:
    """Row ``epoch`` of ``/optimizer/lr`` in the open ``run.h5`` ``f`` (created, earlier rows NaN, in a run
    written before the array existed)."""
    if LR_KEY not in f:
        create_lrs(f, epoch)
    ds = f[LR_KEY]
    ds.resize(epoch + 1, axis=0)
    ds[epoch] = lr


def truncate_lrs(f, epoch: int) -> None:
    """Forget the rows after ``epoch`` (a rewound run)."""
    if LR_KEY in f:
        f[LR_KEY].resize(min(f[LR_KEY].shape[0], epoch + 1), axis=0)


def recorded_lrs(run, epochs) -> np.ndarray | None:
    """The recorded learning rates of ``epochs`` of ``run`` (a :class:`memloc.Run`), or None when the run
    has none for some of them (written before ``/optimizer/lr`` existed, or without the optimiser)."""
    from .run import open_h5
    with open_h5(run.path / "run.h5") as f:
        if LR_KEY not in f:
            return None
        lrs = f[LR_KEY][:]
    epochs = [int(e) for e in np.atleast_1d(np.asarray(epochs))]
    if any(not 0 <= e < len(lrs) for e in epochs):
        return None
    out = lrs[epochs].astype(np.float64)
    return out if np.all(np.isfinite(out)) else None
