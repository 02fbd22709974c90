"""What the layer-level analyses (gradients, rewind, retrain) need to know of a task: the per-example
loss, the training loss, and the scores per subset; one small piece per kind of data.

Importance and unlearning (:mod:`memloc.analyses.importance`, :mod:`memloc.actions.unlearn`) also call
:meth:`output_loss` (the mean loss of a batch's outputs: cross-entropy / suffix loss),
:meth:`importance_loss` (summed over the rows: Fisher's negative log-likelihood of the given label / of
the suffix, MAS's squared norm of the logits / of the suffix positions' logits) and :meth:`group_row`
(what unlearning measures, :attr:`groups`); :func:`select_rows` names subsets of training examples and
:func:`with_targets` re-marks which examples are noisy (the forget set).

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

import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import MemlocError
from .evaluate import accuracy_row, eval_mode, evaluate, nanmean
from .examples import ExampleSet
from .lm import greedy_decode, lm_logits, sequence_measures, suffix_measures
from .schemas import LM_SUBSETS, SUBSETS
from .sequences import SequenceSet, follows_rule

__all__ = ["ClassifierTask", "SequenceTask", "task_of", "with_targets", "select_rows", "split_subsets", "example_input"]


class ClassifierTask:
    """Image (any classifier) data: cross-entropy w.r.t. the given labels, accuracy per subset."""

    subsets = SUBSETS
    #: what unlearning measures (:meth:`group_row`)
    groups = ("forget_given", "forget_true", "retain", "test")
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

    @staticmethod
    def output_loss(out, x, y) -> torch.Tensor:
        """The mean cross-entropy of :meth:`outputs` w.r.t. the given labels."""
        return F.cross_entropy(out, y)

    @staticmethod
    def importance_loss(out, x, y, method: str) -> torch.Tensor:
        """Summed over the rows: ``fisher`` the cross-entropy of the given label, ``mas`` the squared logits."""
        return F.cross_entropy(out, y, reduction="sum") if method == "fisher" else out.pow(2).sum()

    def group_row(self, model: nn.Module, forget, retain, *, batch_size: int = 1024) -> np.ndarray:
        """(4,) over :attr:`groups`: accuracy on the training rows ``forget`` w.r.t. the given labels (the
        memorisation left) and the true ones, on the rows ``retain`` (given labels), on the test set."""
        data = self.data
        train = evaluate(model, data.train.batches(batch_size))
        test = evaluate(model, data.test.batches(batch_size))
        order = np.argsort(train["idx"])
        correct, pred = train["correct"][order].astype(bool), train["pred"][order]
        return np.array([correct[forget].mean(), (pred[forget] == data.label_true[forget]).mean(),
                         correct[retain].mean(), test["correct"].mean() if len(test["correct"]) else np.nan])


class SequenceTask:
    """Language-model data: suffix loss per sequence, next-token training loss, memorised shares."""

    subsets = LM_SUBSETS
    groups = ("forget_given", "forget_true", "retain", "test", "test_rule")
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

    def output_loss(self, out, x, y) -> torch.Tensor:
        """The mean suffix loss of :meth:`outputs`."""
        return self.loss_of(out, x).mean()

    def importance_loss(self, out, x, y, method: str) -> torch.Tensor:
        """Summed over the rows: ``fisher`` the suffix's negative log-likelihood (teacher-forced), ``mas``
        the squared norm of the logits at the positions that predict the suffix."""
        pred = out[:, self.prefix_len - 1:self.prefix_len + self.suffix_len - 1]
        pred = pred if pred.dtype == torch.float64 else pred.float()
        if method != "fisher":
            return pred.pow(2).sum()
        target = x[:, self.prefix_len:self.prefix_len + self.suffix_len]
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")

    def group_row(self, model: nn.Module, forget, retain, *, batch_size: int = 1024) -> np.ndarray:
        """(5,) over :attr:`groups`: the memorised share of the training rows ``forget`` (the memorisation
        left), the share of them whose greedy continuation follows the corpus' rule (TinyMem; else NaN: the
        "true label"), the memorised share of the rows ``retain``, the held-out suffix token accuracy and
        the share of held-out suffixes reproduced (TinyMem: the rule accuracy)."""
        d, p, s = self.data, self.prefix_len, self.suffix_len
        with eval_mode(model):
            train = sequence_measures(model, d.tokens, p, s, eval_batch_size=batch_size)["memorised"].astype(bool)
            test = sequence_measures(model, d.test_tokens, p, s, eval_batch_size=batch_size)
            rule = np.nan
            if d.info.get("generator") == "tinymem" and len(forget):
                prompts = d.tokens[torch.as_tensor(forget, dtype=torch.int64, device=d.tokens.device), :p]
                rows = [torch.cat([x, greedy_decode(model, x, s)], 1) for x in prompts.split(batch_size)]
                rule = follows_rule(torch.cat(rows).cpu(), task=d.info["task"], step=d.info["step"],
                                    modulus=d.info["modulus"]).mean()
        return np.array([nanmean(train[forget]), rule, nanmean(train[retain]), nanmean(test["suffix_accuracy"]),
                         nanmean(test["memorised"])], dtype=np.float64)


def task_of(data):
    """The task piece of ``data``: :class:`SequenceTask` for a SequenceSet, else :class:`ClassifierTask`."""
    return SequenceTask(data) if isinstance(data, SequenceSet) else ClassifierTask(data)


def with_targets(data, mask):
    """A shallow copy of ``data`` whose noisy examples (a language model's memorisation targets) are
    ``mask`` (N,) bool: e.g. the forget set, so that its other examples are the clean ones."""
    mask = np.asarray(mask, dtype=bool)
    if isinstance(data, SequenceSet):
        return dataclasses.replace(data, is_memorised_target=mask)
    out = copy.copy(data)
    out.is_noisy = mask
    return out


def split_subsets(subsets) -> list[str]:
    """``"clean,noisy"`` / ``["clean", "class:3"]`` -> names of :func:`select_rows`; an ``ids:1,2,3`` item stays
    whole (its commas separate ids, not subsets)."""
    from .runtime import split_list
    out = []
    for item in list(subsets) if isinstance(subsets, (list, tuple)) else [subsets]:
        ids = isinstance(item, str) and item.strip().startswith("ids:")
        out += [item.strip()] if ids else split_list(item) or []
    return out


def select_rows(data, subset: str, *, flagged=None, argument: str = "subsets") -> np.ndarray:
    """Training-example ids of ``subset``: clean, noisy, all, flagged (ids given), class:C or ids:1,2,3
    (a language model's :class:`memloc.core.sequences.SequenceSet`: noisy = the memorisation targets, no class:C)."""
    sequences = isinstance(data, SequenceSet)
    n = len(data) if sequences else len(data.label_given)
    noisy = np.asarray(data.is_memorised_target if sequences else data.is_noisy, dtype=bool)
    if subset == "clean":
        return np.flatnonzero(~noisy)
    if subset == "noisy":
        return np.flatnonzero(noisy)
    if subset == "all":
        return np.arange(n)
    if subset == "flagged":
        if flagged is None:
            raise MemlocError(f"{argument} 'flagged' needs the flags of memloc issues (RUN/results/issues.h5): run it first",
                              argument=argument)
        return np.flatnonzero(np.asarray(flagged, dtype=bool))
    if subset.startswith("class:"):
        if sequences:
            raise MemlocError(f"{argument} {subset!r}: a language model's sequences have no classes; valid: clean, "
                              "noisy (the memorisation targets), all, flagged, ids:1,2,3", argument=argument)
        try:
            c = int(subset.split(":", 1)[1])
        except ValueError:
            raise MemlocError(f"{argument} {subset!r} is not class:C", argument=argument) from None
        return np.flatnonzero(np.asarray(data.label_given) == c)
    if subset.startswith("ids:"):
        try:
            ids = np.array(sorted({int(t) for t in subset[4:].split(",") if t.strip()}), dtype=np.int64)
        except ValueError:
            raise MemlocError(f"{argument} {subset!r} is not ids:1,2,3", argument=argument) from None
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise MemlocError(f"{argument} {subset!r} holds ids outside 0..{n - 1}", argument=argument)
        return ids
    raise MemlocError(f"{argument} names an unknown subset {subset!r}; valid: clean, noisy, all, flagged, class:C, ids:1,2,3",
                      argument=argument)


def example_input(data) -> torch.Tensor:
    """Two training inputs of ``data`` (to trace a model's layers with)."""
    return data.tokens[:2] if isinstance(data, SequenceSet) else data.train.x[:2]
