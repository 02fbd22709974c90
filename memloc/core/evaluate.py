"""The one evaluation helper: batched forward passes, per-example stats, subset accuracies.

Every pass runs the whole model in eval mode and restores each module's own train flag after
(also on error).
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .schemas import SUBSETS

__all__ = ["SUBSETS", "eval_mode", "per_example_stats", "evaluate", "subset_accuracies", "accuracies", "accuracy_row",
           "nanmean"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every module of ``model`` in eval mode inside the block; each module's flag restored after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags.items():
            m.train(t)


def per_example_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy loss, correctness and margin (label logit - best other logit), each (B,)."""
    logits = logits.detach().float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    label_logit = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return {"loss": loss, "correct": (logits.argmax(1) == labels), "margin": label_logit - other}


def nanmean(a) -> float:
    return float(np.mean(a)) if len(a) else float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, *, logits: bool = False) -> dict[str, np.ndarray]:
    """Per-example stats of ``model`` (eval mode) over ``(x, y, idx)`` batches, in the order given.

    Returns ``{"idx", "loss", "correct", "margin", "pred"}`` numpy arrays (N,), and ``"logits"``
    (N, C) float64 when ``logits`` is true.
    """
    keys = ("idx", "loss", "correct", "margin", "pred") + (("logits",) if logits else ())
    out: dict[str, list] = {k: [] for k in keys}
    with eval_mode(model):
        for x, y, idx in batches:
            z = model(x)
            stats = per_example_stats(z, y)
            stats.update(idx=torch.as_tensor(idx), pred=z.argmax(1), logits=z.double())
            for k in keys:
                out[k].append(stats[k].cpu())
    return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in out.items()}


def subset_accuracies(correct, pred, is_noisy, label_true) -> dict[str, float]:
    """``clean`` / ``noisy`` / ``noisy_true`` accuracies from per-example (N,) arrays in id order."""
    correct, noisy = np.asarray(correct).astype(bool), np.asarray(is_noisy, dtype=bool)
    return {"clean": nanmean(correct[~noisy]), "noisy": nanmean(correct[noisy]),
            "noisy_true": nanmean(np.asarray(pred)[noisy] == np.asarray(label_true)[noisy])}


def accuracies(model: nn.Module, data, *, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy of ``model`` (eval mode) on the subsets :data:`SUBSETS` of a :class:`memloc.core.data.Data`.

    ``clean``: clean training examples; ``noisy``: noisy ones w.r.t. their given (wrong) labels,
    i.e. the fraction still memorised; ``noisy_true``: noisy ones w.r.t. their true labels;
    ``test``: the test set (NaN when it is empty).
    """
    train = evaluate(model, data.train.batches(batch_size))
    order = np.argsort(train["idx"])
    test = evaluate(model, data.test.batches(batch_size))
    return {**subset_accuracies(train["correct"][order], train["pred"][order], data.is_noisy, data.label_true),
            "test": nanmean(test["correct"])}


def accuracy_row(model: nn.Module, data, *, batch_size: int = 1024) -> np.ndarray:
    """:func:`accuracies` as a (4,) float64 array ordered like :data:`SUBSETS`."""
    acc = accuracies(model, data, batch_size=batch_size)
    return np.array([acc[s] for s in SUBSETS], dtype=np.float64)
