"""What the scores read per kind of run: an image classifier's examples or a language model's sequences.

The scores (:mod:`memloc.analyses.scores`) are one code path; this module holds the pieces that
differ. A classifier's example is an input with a given label; its loss is the cross-entropy of the
label, its correctness whether the label is the argmax. A language model's example is a training
sequence (:class:`memloc.core.sequences.SequenceSet`), its memorisation targets playing the noisy
examples' role; its loss is the **suffix loss** (the mean cross-entropy of the suffix tokens given
everything before them, :func:`memloc.core.lm.suffix_measures`) and its correctness **exact
memorisation** (greedy decoding from the prefix reproduces the suffix), as recorded by
:mod:`memloc.training.lm`.
"""
from __future__ import annotations

import numpy as np
import torch

from ...core.errors import MemlocError
from ...core.evaluate import eval_mode, evaluate
from ...core.lm import lm_logits, lm_rows, suffix_measures
from ...core.precision import autocast
from .functions import el2n
from .gradnorm import batch_grad_norms
from .passes import EL2N, LOGITS

__all__ = ["ClassifierTask", "SequenceTask", "SuffixLoss"]


class SuffixLoss:
    """A language model's per-sequence loss for the gradient norms: the mean cross-entropy of the suffix
    ``tokens[:, prefix_len:prefix_len + suffix_len]`` of each sequence ``x`` (B, T), teacher-forced."""

    def __init__(self, prefix_len: int, suffix_len: int):
        self.prefix_len, self.suffix_len = int(prefix_len), int(suffix_len)

    def __call__(self, model, x, y=None, call=None) -> torch.Tensor:
        end = self.prefix_len + self.suffix_len
        logits = lm_logits(model, x[:, :end - 1], call=call)
        return suffix_measures(logits, x, self.prefix_len, self.suffix_len)[0]


class ClassifierTask:
    """An image classifier's training examples (:class:`memloc.core.data.ExampleSet`)."""

    lm = False
    #: the run's dynamics each score reads: loss, correctness, margin
    dynamics = {"loss": "loss", "correct": "correct", "margin": "margin"}
    el2n_kind = LOGITS          # el2n reads the logits, turned into EL2N with the given labels

    def examples(self, data):
        train = data.train
        if not torch.equal(train.idx.cpu(), torch.arange(len(train))):
            raise MemlocError("the training set does not list its examples in id order")
        return train

    def cell(self, kind: int, model, examples, *, batch_size: int, grad_method: str, precision: str, device):
        batches = examples.batches(batch_size)
        if kind == LOGITS:      # in the chosen precision; the gradient norms stay float32
            with autocast(precision, device):
                return evaluate(model, batches, logits=True)["logits"]
        return batch_grad_norms(model, batches, method=grad_method)

    def el2n(self, value: np.ndarray, given: np.ndarray) -> np.ndarray:
        return el2n(value, given)


class SequenceTask:
    """A language model's training sequences; EL2N and GraNd on the suffix (module docstring)."""

    lm = True
    dynamics = {"loss": "suffix_loss", "correct": "memorised", "margin": None}
    el2n_kind = EL2N            # EL2N per sequence in the cell: (S, V) logits per sequence are not kept

    def __init__(self, prefix_len: int, suffix_len: int):
        self.loss = SuffixLoss(prefix_len, suffix_len)

    def examples(self, data):
        return data             # a SequenceSet: its rows are the sequences 0..N-1

    def batches(self, examples, batch_size: int):
        end = self.loss.prefix_len + self.loss.suffix_len
        tokens = examples.tokens[:, :end]
        for i in range(0, len(tokens), batch_size):
            yield tokens[i:i + batch_size], tokens[i:i + batch_size]

    def cell(self, kind: int, model, examples, *, batch_size: int, grad_method: str, precision: str, device):
        batches = self.batches(examples, lm_rows(model, batch_size, self.loss.prefix_len + self.loss.suffix_len - 1))
        if kind != EL2N:
            return batch_grad_norms(model, batches, method=grad_method, loss=self.loss)
        p, s = self.loss.prefix_len, self.loss.suffix_len
        out = []
        with eval_mode(model), torch.no_grad():
            for x, _ in batches:
                with autocast(precision, device):
                    logits = lm_logits(model, x[:, :p + s - 1])
                out.append(el2n(logits[:, p - 1:], x[:, p:p + s]))
        return np.concatenate(out) if out else np.zeros(0)

    def el2n(self, value: np.ndarray, given) -> np.ndarray:
        return value
