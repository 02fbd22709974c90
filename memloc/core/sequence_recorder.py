"""The run directory of a language model, write side: :class:`SequenceRecorder`.

The same run directory as a classifier's (:class:`memloc.core.recorder.RunWriter`: lock, checkpoints
every epoch, ``run.h5`` appended atomically, resume), with sequences for examples and the suffix
measures for dynamics (:data:`memloc.core.run.LM_DYN_NAMES`, :data:`memloc.core.run.LM_METRICS`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .dropout import dropout_layers, example_ids, sink_ids, sinks_spec
from .dropout.sinks import SINK_IDS
from .errors import MemlocError
from .evaluate import eval_mode, nanmean
from .h5 import put
from .lm import check_lm, hf_config_of, sequence_measures, suffix_measures
from .precision import check_precision
from .recorder import RunWriter
from .run import LM_METRICS
from .runtime import check_range
from .sequences import KINDS, SequenceSet, plain

__all__ = ["SequenceRecorder"]


class SequenceRecorder(RunWriter):
    """Write a language model's memloc run from any training loop.

    Example::

        data = memloc.tinymem("mult", noise=0.1)
        rec = SequenceRecorder("runs/lm", model, data, model_spec={"spec": "gpt", "options": {...}})
        for epoch in range(epochs):
            for idx in batches:                     # rows of data.tokens
                x = data.tokens[idx]
                logits = memloc.lm_logits(model, x[:, :-1]); ...; rec.record_batch(idx, logits, x)
            rec.end_epoch()                         # measures every sequence, checkpoints

    ``data``: a :class:`memloc.core.sequences.SequenceSet` (its targets play the noisy examples'
    role). ``model_spec``: ``{"spec": name, "options": {...}}`` of :func:`memloc.core.lm.build_lm`, so
    that ``memloc.load(RUN).model()`` rebuilds the model; ``data_spec``: a corpus spec of
    :func:`memloc.core.corpora.build_sequences`, so that ``data()`` rebuilds the sequences.
    ``precision``: the end-of-epoch passes under autocast. ``resume`` / ``overwrite`` as for
    :class:`memloc.core.recorder.Recorder`. ``evaluated`` (here a new run's epoch 0, and
    :meth:`end_epoch`'s): the end-of-epoch measures done elsewhere (split across processes,
    :func:`memloc.scale.ddp.measures_split`), ``{"train": ..., "test": ...}`` of
    :func:`memloc.core.lm.sequence_measures`. ``optimizer``: as for :class:`memloc.core.recorder.Recorder`
    (each epoch's mean learning rate recorded; or :meth:`record_lr` at every step).
    """

    DYNAMICS = {"suffix_loss": (np.float32, np.nan), "suffix_accuracy": (np.float32, np.nan),
                "memorised": (np.int8, -1)}
    METRIC_NAMES = LM_METRICS

    def __init__(self, run_dir, model: nn.Module, data: SequenceSet, *, config: dict | None = None,
                 model_spec: dict | None = None, data_spec: dict | None = None, resume: bool = False,
                 overwrite: bool = False, eval_batch_size: int = 1024, precision: str = "fp32", argv=None,
                 evaluated: dict | None = None, optimizer=None):
        if not isinstance(data, SequenceSet):
            raise MemlocError(f"data must be a SequenceSet (memloc.tinymem, memloc.canaries), got "
                              f"{type(data).__name__}", argument="data")
        eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
        self.data, self.eval_batch_size, self.precision = data, eval_batch_size, check_precision(precision)
        self.n = len(data)
        # the held-out rule accuracy means something only for sequences that follow a rule (TinyMem's)
        self.has_rule = (data.info or {}).get("generator") == "tinymem"
        self.METRIC_NAMES = tuple(k for k in LM_METRICS if self.has_rule or k != "test_rule_accuracy")
        self.is_noisy = np.asarray(data.is_memorised_target, dtype=bool)
        self._model_spec, self._data_spec = model_spec, data_spec
        self._sinks = sinks_spec(model) if not (model_spec or {}).get("etd") else None
        if dropout_layers(model) and not (model_spec or {}).get("etd") and self._sinks is None:
            raise MemlocError("the model has example-tied dropout layers that run.json could not rebuild: put "
                              "memorisation sinks in with memloc.insert_sinks(model, ...)", argument="model")
        self._sink_ids = sink_ids(data) if dropout_layers(model) else None
        check_lm(model, data.tokens)        # (B, T, V) logits covering every token id, before any file is written
        self._start(run_dir, model, resume=resume, overwrite=overwrite, config=config, argv=argv, evaluated=evaluated,
                    optimizer=optimizer)

    def _describe(self) -> dict:
        cls = f"{type(self.model).__module__}.{type(self.model).__qualname__}"
        model = {"class": cls, "spec": None, **(self._model_spec or {})}
        if model["spec"] is None and hf_config_of(self.model) is not None:   # rebuilt from its config
            model["hf_config"] = hf_config_of(self.model)
        if self._sinks is not None:           # memloc.insert_sinks: run.model() puts the same sinks back
            model.update(etd=self._sinks, etd_ids=SINK_IDS)
        out = {"kind": "lm", "model": model, "num_test": len(self.data.test_tokens), "sequence_set": self.data.name,
               "prefix_len": self.data.prefix_len, "suffix_len": self.data.suffix_len,
               "vocab": list(self.data.vocab), "sequence_info": plain(self.data.info)}
        if self._data_spec is not None:
            out["data"] = dict(self._data_spec)
        return out

    def _write_examples(self, f) -> None:
        d = self.data
        ex = f.create_group("examples")
        put(ex, "index", np.arange(self.n), dims=["example"])
        put(ex, "source_index", d.ids, dims=["example"])
        put(ex, "is_noisy", self.is_noisy, dims=["example"])
        put(ex, "kind", d.kind, dims=["example"])
        put(ex, "copy_of", d.copy_of, dims=["example"])
        put(ex, "tokens", d.tokens.cpu().numpy(), dims=["example", "position"])
        te = f.create_group("test")
        put(te, "index", np.arange(len(d.test_tokens)), dims=["example"])
        put(te, "tokens", d.test_tokens.cpu().numpy(), dims=["example", "position"])

    def sinks(self, idx):
        """Context manager binding the sink ids of the sequences ``idx`` (rows of ``data``) to the model's
        memorisation sinks (:func:`memloc.insert_sinks`) for the training forwards inside it: each sequence
        through its own sinks, a duplicate through the sinks of the sequence it copies."""
        if self._sink_ids is None:
            raise MemlocError("the model has no memorisation sinks (memloc.insert_sinks(model, ...) before the "
                              "recorder)", argument="model")
        rows = self._rows(idx, len(torch.as_tensor(idx).reshape(-1)), "the batch")
        return example_ids(self.model, self._sink_ids[torch.as_tensor(rows)])

    def record_batch(self, idx, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record the suffix measures of a training batch: ``logits`` (B, T', V) of the batch's
        sequences ``tokens`` (B, T) in training mode (or a ``transformers`` output holding them),
        ``idx`` their rows in ``data``."""
        logits = logits if torch.is_tensor(logits) else getattr(logits, "logits", logits)   # a transformers output
        tokens = torch.as_tensor(tokens)
        if not torch.is_tensor(logits) or logits.ndim != 3 or tokens.ndim != 2 or len(logits) != len(tokens):
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise MemlocError(f"record_batch: logits {shape} and tokens {tuple(tokens.shape)} must be (B, T', V) "
                              "and (B, T) (the model's output for the batch's sequences)", argument="logits")
        rows = self._rows(idx, len(logits), "logits")
        with torch.no_grad():
            stats = suffix_measures(logits.detach(), tokens, self.data.prefix_len, self.data.suffix_len)
        for k, v in zip(self.DYNAMICS, stats):
            self._presentation[k][rows] = v.cpu().numpy()

    def _rows(self, idx, n: int, what: str) -> np.ndarray:
        rows = torch.as_tensor(idx).cpu().numpy()
        if rows.shape != (n,) or (len(rows) and (rows.min() < 0 or rows.max() >= self.n)):
            raise MemlocError(f"record_batch: idx must hold one sequence id in 0..{self.n - 1} per row of {what}")
        return rows

    def record_measures(self, idx, measures: dict) -> None:
        """Record a training batch's suffix measures computed elsewhere (its slices on several
        processes, gathered): ``measures`` as :func:`memloc.core.lm.suffix_measures` gives them, by name
        (:data:`memloc.core.lm.MEASURES`), one value per sequence id of ``idx``."""
        rows = self._rows(idx, len(measures["memorised"]), "measures")
        for k in self.DYNAMICS:
            self._presentation[k][rows] = np.asarray(measures[k])

    def _measure(self, tokens) -> dict[str, np.ndarray]:
        with eval_mode(self.model):
            return sequence_measures(self.model, tokens, self.data.prefix_len, self.data.suffix_len,
                                     eval_batch_size=self.eval_batch_size, precision=self.precision)

    def _evaluate_epoch(self, evaluated) -> tuple[dict, dict]:
        if evaluated is None:
            train, test = self._measure(self.data.tokens), self._measure(self.data.test_tokens)
        else:
            train, test = evaluated["train"], evaluated["test"]
        rows = {k: train[k].astype(np.int8 if k == "memorised" else np.float32) for k in self.DYNAMICS}
        mem, kind = train["memorised"].astype(bool), self.data.kind
        metrics = {"train_loss": nanmean(train["suffix_loss"]), "train_accuracy": nanmean(train["suffix_accuracy"]),
                   "memorised": nanmean(mem), "target_memorised": nanmean(mem[self.is_noisy]),
                   **{f"{k}_memorised": nanmean(mem[kind == k]) for k in KINDS},
                   "test_loss": nanmean(test["suffix_loss"]), "test_accuracy": nanmean(test["suffix_accuracy"])}
        if self.has_rule:
            metrics["test_rule_accuracy"] = nanmean(test["memorised"])
        return rows, metrics
