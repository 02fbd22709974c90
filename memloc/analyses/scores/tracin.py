"""TracIn self-influence (TracInCP, Pruthi et al. 2020) from per-example gradient norms.

The self-influence of a training example z = (x, y) is

    TracInCP(z, z) = sum over checkpoints c of  eta_c * ||grad_theta CE(f_c(x), y)||^2,

with eta_c the learning rate of the steps that led to checkpoint c (the checkpoint of epoch e
stands for the steps of epoch e). Examples the network has to be pushed hardest to fit -- mislabeled
ones -- have large gradients over many checkpoints. :func:`tracin_self_influence` takes the squared
norms from :func:`memloc.analyses.scores.grad_norms` (one forward and one backward pass per batch and
checkpoint, exact) rather than from materialised per-example gradients (what
``captum.influence.TracInCP.self_influence`` computes; the tests check both agree).
:func:`checkpoint_lrs` gives each checkpoint's eta from a memloc training config, :func:`run_lrs` from
the learning rates the run recorded (``run.h5``'s ``/optimizer/lr``, :mod:`memloc.core.learning_rates`)
when it has them, else from its config.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ...core.errors import MemlocError
from ...core.learning_rates import recorded_lrs
from ...core.optim import lr_factor
from .gradnorm import grad_norms

__all__ = ["tracin_self_influence", "tracin_from_norms", "checkpoint_lrs", "run_lrs", "SCHEDULE_KEYS", "LR_SOURCES"]

SCHEDULE_KEYS = ("lr", "schedule", "epochs", "batch_size")   # config keys checkpoint_lrs needs
#: where :func:`run_lrs` found the weights: the run's recorded rates, its config's schedule, nowhere (all 1)
LR_SOURCES = ("recorded", "config schedule", "none: 1")


def tracin_self_influence(models: Iterable[nn.Module], weights, x: torch.Tensor, y: torch.Tensor, *,
                          method: str = "hooks", batch_size: int = 256) -> np.ndarray:
    """TracInCP self-influence: sum over checkpoints of ``weights[c] * ||grad CE(f_c(x_i), y_i)||^2``.

    Parameters
    ----------
    models : one model per checkpoint; any iterable (a generator loads each checkpoint only when it
        is reached, so one model is in memory at a time). Evaluated in eval mode, never modified.
    weights : (C,) the checkpoints' learning rates (:func:`checkpoint_lrs`), finite and >= 0.
    x, y : (N, ...) inputs and (N,) labels on the models' device.
    method, batch_size : as in :func:`memloc.analyses.scores.grad_norms` (``hooks``: one forward and one
        backward pass per batch).

    Returns
    -------
    (N,) float64 numpy array (higher = more self-influence = more likely mislabeled / memorised).
    """
    norms = (grad_norms(model, x, y, method=method, batch_size=batch_size) for model in models)
    return tracin_from_norms(norms, weights, num_examples=len(y))


def tracin_from_norms(norms: Iterable[np.ndarray], weights, *, num_examples: int) -> np.ndarray:
    """TracInCP self-influence from each checkpoint's (N,) per-example gradient norms (any iterable,
    consumed one at a time): ``sum_c weights[c] * norms[c] ** 2``, added up in checkpoint order."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise MemlocError("weights must be a list of finite learning rates >= 0, one per checkpoint",
                          argument="weights")
    total = np.zeros(num_examples, dtype=np.float64)
    used = 0
    for norm in norms:
        if used == len(weights):
            raise MemlocError(f"more models than weights ({len(weights)})", argument="models")
        total += weights[used] * np.asarray(norm, dtype=np.float64) ** 2
        used += 1
    if used != len(weights):
        raise MemlocError(f"{used} models for {len(weights)} weights: give one weight per checkpoint",
                          argument="models")
    if used == 0:
        raise MemlocError("no checkpoints given", argument="models")
    return total


def checkpoint_lrs(config: dict, epochs, num_train: int) -> np.ndarray:
    """The learning rate in effect during each checkpoint's epoch: the TracIn weights.

    For the checkpoint of epoch e (>= 1) this is ``config["lr"]`` times the mean of
    :func:`memloc.core.optim.lr_factor` over the optimiser steps of epoch e (steps per epoch =
    ceil(num_train / batch_size); the schedule spans steps per epoch x ``config["epochs"]``), as
    :func:`memloc.train` steps it. Momentum and Adam's rescaling are ignored, as in TracIn.

    A config without the keys of :data:`SCHEDULE_KEYS` (a run recorded by your own training loop
    through :class:`memloc.Recorder`) gives every checkpoint weight 1, with a warning saying so
    (:func:`run_lrs` first reads the rates such a run recorded).
    """
    epochs = [int(e) for e in np.atleast_1d(np.asarray(epochs))]
    missing = [k for k in SCHEDULE_KEYS if config.get(k) is None]
    if missing:
        warnings.warn(f"the run's config has no {', '.join(missing)} (recorded by its own training loop?): "
                      "TracIn weights every checkpoint 1 instead of its learning rate", stacklevel=2)
        return np.ones(len(epochs))
    lr, total_epochs, batch = float(config["lr"]), int(config["epochs"]), int(config["batch_size"])
    bad = [e for e in epochs if not 1 <= e <= total_epochs]
    if bad:
        raise MemlocError(f"checkpoint epochs {bad} are outside the trained epochs 1..{total_epochs} "
                          "(epoch 0 is the initialisation: no step leads to it)", argument="epochs")
    if num_train < 1 or batch < 1:
        raise MemlocError(f"need num_train >= 1 and batch_size >= 1 (got {num_train}, {batch})")
    per_epoch = math.ceil(num_train / batch)
    total = per_epoch * total_epochs
    schedule, warmup = config["schedule"], float(config.get("warmup") or 0.0)
    return np.array([lr * np.mean([lr_factor(s, total, schedule, warmup)
                                   for s in range((e - 1) * per_epoch, e * per_epoch)]) for e in epochs])


def run_lrs(run, epochs) -> tuple[np.ndarray, str]:
    """The TracIn weights of the checkpoints ``epochs`` of ``run`` (a :class:`memloc.Run`) and where they
    come from (:data:`LR_SOURCES`): the learning rates the run recorded for those epochs (``run.h5``'s
    ``/optimizer/lr``: every run memloc trains, and those of :class:`memloc.Recorder` given the optimiser,
    of the Hugging Face and Lightning callbacks), else :func:`checkpoint_lrs` of its config (runs written
    before the rates were recorded), else 1 with a warning."""
    recorded = recorded_lrs(run, epochs)
    if recorded is not None:
        return recorded, "recorded"
    source = LR_SOURCES[2] if any(run.config.get(k) is None for k in SCHEDULE_KEYS) else LR_SOURCES[1]
    return checkpoint_lrs(run.config, epochs, run.num_train), source
