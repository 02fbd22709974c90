"""What the layer-level analyses (gradients, rewind, retrain) need to know of a task: the per-example
loss, the training loss, and the scores per subset; one small piece per kind of data.

- **classifiers** (:class:`memloc.core.data.Data`): the loss is the cross-entropy w.r.t. the given
  label, an example is "right" when the argmax is its given label; the subsets are
  :data:`memloc.core.schemas.SUBSETS` (clean, noisy w.r.t. given and true labels, test accuracy).
- **language models** (:class:`memloc.core.sequences.SequenceSet`): the memorisation targets play
  the noisy examples, the other training sequences the clean ones. An example's loss is its
  *suffix loss* (mean cross-entropy over the suffix tokens, teacher-forced), the training loss the
  next-token loss over whole sequences (as :func:`memloc.training.lm.train_lm` trains), and a
  sequence is "right" when it is exactly memorised (the argmax right at every suffix position, as
  :func:`memloc.memorisation`); the subsets are :data:`memloc.core.schemas.LM_SUBSETS`.

``task_of(data)`` picks the piece; analyses call its :attr:`train` / :attr:`clean_train` (example
sets of ``(x, y, idx)`` batches: for sequences ``x`` the token rows, ``y`` their ids),
:meth:`losses`, :meth:`train_loss` and :meth:`subset_row`. An analysis that runs one forward on
several kinds of rows at once (the flip search) uses the pieces of :meth:`losses`: :meth:`target`
(what an example's loss compares with: its label, or its own token row), :meth:`outputs` (the model's
outputs of a batch), :meth:`loss_of` (the per-example loss of outputs) and :meth:`right` (is the
example right: the label predicted, or the suffix reproduced exactly).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import accuracy_row, eval_mode, nanmean
from .examples import ExampleSet
from .lm import lm_logits, sequence_measures, suffix_measures
from .schemas import LM_SUBSETS, SUBSETS
from .sequences import SequenceSet

__all__ = ["ClassifierTask", "SequenceTask", "task_of"]


class ClassifierTask:
    """Image (any classifier) data: cross-entropy w.r.t. the given labels, accuracy per subset."""

    subsets = SUBSETS
    prefix_cache = True          # the frozen front of the model may be cached (memloc.scale.prefix)

    def __init__(self, data):
        self.data = data
        self.is_noisy = np.asarray(data.is_noisy, dtype=bool)

    @property
    def train(self) -> ExampleSet:
        return self.data.train

    @property
    def clean_train(self) -> ExampleSet:
        return self.data.clean_train

    @staticmethod
    def losses(model: nn.Module, x, y) -> torch.Tensor:
        """(B,) per-example loss (differentiable)."""
        return ClassifierTask.loss_of(ClassifierTask.outputs(model, x), y)

    @staticmethod
    def target(x, y):
        """What an example's loss compares with: its given label."""
        return y

    @staticmethod
    def outputs(model: nn.Module, x) -> torch.Tensor:
        """(B, C) logits."""
        return model(x)

    @staticmethod
    def loss_of(outputs: torch.Tensor, target) -> torch.Tensor:
        """(B,) cross-entropy of ``outputs`` w.r.t. the labels ``target`` (differentiable)."""
        return F.cross_entropy(outputs, target, reduction="none")

    @staticmethod
    def right(outputs: torch.Tensor, target) -> torch.Tensor:
        """(B,) bool: is the label the argmax?"""
        return outputs.argmax(-1) == target

    @staticmethod
    def train_loss(model: nn.Module, x, y) -> torch.Tensor:
        """The mean training loss of a batch."""
        return F.cross_entropy(model(x), y)

    def subset_row(self, model: nn.Module, data=None, *, batch_size: int = 1024) -> np.ndarray:
        """(S,) float64 over :attr:`subsets` (``data``: the data to score on, default the task's)."""
        return accuracy_row(model, self.data if data is None else data, batch_size=batch_size)


class SequenceTask:
    """Language-model data: suffix loss per sequence, next-token training loss, memorised shares."""

    subsets = LM_SUBSETS
    prefix_cache = False         # a transformer's residual stream has no single cut before a layer

    def __init__(self, data: SequenceSet):
        self.data = data
        self.is_noisy = np.asarray(data.is_memorised_target, dtype=bool)
        self.prefix_len, self.suffix_len = data.prefix_len, data.suffix_len
        ids = torch.as_tensor(data.ids, dtype=torch.int64, device=data.tokens.device)
        self._train = ExampleSet(data.tokens, ids, ids)

    @property
    def train(self) -> ExampleSet:
        return self._train

    @property
    def clean_train(self) -> ExampleSet:
        return self._train.subset(~self.is_noisy)

    def losses(self, model: nn.Module, x, y) -> torch.Tensor:
        """(B,) suffix loss of each token row of ``x`` (differentiable)."""
        return self.loss_of(self.outputs(model, x), x)

    def target(self, x, y):
        """What a sequence's loss compares with: its own tokens up to the end of the suffix."""
        return x[..., :self.prefix_len + self.suffix_len]

    def outputs(self, model: nn.Module, x) -> torch.Tensor:
        """(B, prefix_len + suffix_len - 1, V) teacher-forced logits of the token rows ``x``."""
        return lm_logits(model, x[:, :self.prefix_len + self.suffix_len - 1])

    def loss_of(self, outputs: torch.Tensor, target) -> torch.Tensor:
        """(B,) suffix loss of ``outputs`` (:meth:`outputs`) w.r.t. the token rows ``target`` (differentiable)."""
        return suffix_measures(outputs, target, self.prefix_len, self.suffix_len)[0]

    def right(self, outputs: torch.Tensor, target) -> torch.Tensor:
        """(B,) bool: is the suffix exactly memorised (the argmax right at every suffix position)?"""
        return suffix_measures(outputs, target, self.prefix_len, self.suffix_len)[2]

    def train_loss(self, model: nn.Module, x, y) -> torch.Tensor:
        """The next-token loss over whole sequences (the language-model trainer's)."""
        logits = lm_logits(model, x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))

    def subset_row(self, model: nn.Module, data=None, *, batch_size: int = 1024) -> np.ndarray:
        """(5,) over :data:`LM_SUBSETS`: memorised share of clean sequences and of targets, suffix token
        accuracy of clean and of held-out sequences, exactly reproduced share of held-out suffixes."""
        d = self.data if data is None else data
        with eval_mode(model):
            train = sequence_measures(model, d.tokens, self.prefix_len, self.suffix_len, eval_batch_size=batch_size)
            test = sequence_measures(model, d.test_tokens, self.prefix_len, self.suffix_len,
                                     eval_batch_size=batch_size)
        mem, noisy = train["memorised"].astype(bool), self.is_noisy
        row = {"clean": nanmean(mem[~noisy]), "noisy": nanmean(mem[noisy]),
               "clean_tokens": nanmean(train["suffix_accuracy"][~noisy]),
               "test_tokens": nanmean(test["suffix_accuracy"]), "test": nanmean(test["memorised"])}
        return np.array([row[s] for s in LM_SUBSETS], dtype=np.float64)


def task_of(data):
    """The task piece of ``data``: :class:`SequenceTask` for a SequenceSet, else :class:`ClassifierTask`."""
    return SequenceTask(data) if isinstance(data, SequenceSet) else ClassifierTask(data)


def example_input(data) -> torch.Tensor:
    """Two training inputs of ``data`` (to trace a model's layers with)."""
    return data.tokens[:2] if isinstance(data, SequenceSet) else data.train.x[:2]
