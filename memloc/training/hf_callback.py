"""A Hugging Face ``Trainer`` run as a memloc run: :class:`HFTrainerCallback`.

The callback writes the run directory of a language model
(:class:`memloc.core.sequence_recorder.SequenceRecorder`) beside the ``Trainer``'s own output: epoch 0
(the initialisation) when training begins, then at every epoch end one teacher-forced forward over the
:class:`memloc.core.sequences.SequenceSet` (suffix loss, suffix token accuracy, memorised, per
sequence; the held-out metrics) and a checkpoint. The model is rebuilt from its recorded
``transformers`` config, the sequences from ``run.h5``, so ``memloc.load(RUN)`` reads it exactly like a
run of ``memloc train``.

The presentation dynamics (``/dynamics/presentation``: each sequence's measures in the training forward
that last saw it in the epoch) come from a forward hook on the model: the ``Trainer`` hands callbacks no
batch ids, so each row of ``input_ids`` is matched to the sequence of ``data`` holding the same tokens (a
``duplicate`` and the rows it copies hold the same tokens: each of them records the latest forward of any
of them). Rows that are no sequence of ``data`` are not recorded. Under ``torchrun`` each process's rows are
measured where they are trained and gathered for process zero.
An epoch the ``Trainer`` stops in the middle of (``max_steps``) is not recorded. ``trainer.train(resume_from_checkpoint=...)``
continues the run from a checkpoint saved at an epoch end (``save_strategy="epoch"``) that the run
holds. In a multi-process run only the world's process zero writes.

Memorisation sinks (MemSinks): a model given sinks with :func:`memloc.insert_sinks` before the ``Trainer``
is built trains each sequence through its own sinks: before every training forward, on every process, the
callback binds each row's sink id (the row of ``data`` holding its tokens; copies share the id of the
sequence they copy), and a row that is no sequence of ``data`` is an error. ``run.json`` records the
sinks, so ``memloc dropout RUN`` rebuilds and evaluates them as for ``memloc train --etd-after mlp``.

The learning rate of every optimiser step (``param_groups[0]["lr"]`` before it: the ``Trainer``'s schedule)
is recorded; each epoch's mean is ``run.h5``'s ``/optimizer/lr``, the weight TracIn gives its checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from ..core.dropout import example_ids, sink_ids, sinks_spec
from ..core.errors import MemlocError
from ..core.run import is_complete
from ..core.sequence_recorder import SequenceRecorder
from ..core.sequences import SequenceSet
from ..scale.ddp import gather_suffix_measures
from ..scale.distributed import world
from .common import continue_at

__all__ = ["HFTrainerCallback"]

#: the ``TrainingArguments`` recorded in ``run.json``'s config (under ``"trainer"``)
ARGS = ("num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
        "weight_decay", "lr_scheduler_type", "warmup_steps", "optim", "seed", "max_steps")


class _Rows(torch.utils.data.Dataset):
    """The training sequences as ``{"input_ids", "labels"}`` items (the Trainer's causal-LM loss)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class HFTrainerCallback(TrainerCallback):
    """Record a ``transformers.Trainer`` run into ``run_dir`` (see the module docstring).

    Example::

        data = memloc.tinymem("mult", n_train=256, noise=0.1)
        model = memloc.hf_causal_lm("gpt2", vocab_size=data.vocab_size, max_len=data.seq_len)
        cb = memloc.HFTrainerCallback("runs/hf", data)
        Trainer(model=model, args=TrainingArguments("out", num_train_epochs=5, use_cpu=True, report_to=[]),
                train_dataset=cb.train_dataset(), callbacks=[cb]).train()
        run = memloc.load("runs/hf")                 # run.dynamics("memorised"), run.model(epoch), run.data()

    ``data``: the :class:`memloc.core.sequences.SequenceSet` the ``Trainer`` trains on, in the same
    order (:meth:`train_dataset` gives its rows as the ``Trainer``'s items; a training set of another
    length is an error). ``config``: recorded in ``run.json`` beside the ``Trainer``'s settings;
    ``model_spec`` / ``data_spec`` / ``overwrite`` / ``eval_batch_size`` / ``precision`` as for
    :class:`memloc.core.sequence_recorder.SequenceRecorder`. ``metrics``: each recorded epoch's
    metrics (:data:`memloc.core.run.LM_METRICS`).
    """

    def __init__(self, run_dir, data: SequenceSet, *, config: dict | None = None, model_spec: dict | None = None,
                 data_spec: dict | None = None, overwrite: bool = False, eval_batch_size: int = 1024,
                 precision: str = "fp32"):
        if not isinstance(data, SequenceSet):
            raise MemlocError(f"data must be a SequenceSet (memloc.tinymem, memloc.canaries), got "
                              f"{type(data).__name__}", argument="data")
        self.run_dir, self.data = Path(run_dir), data
        self._options = dict(config=config, model_spec=model_spec, data_spec=data_spec, overwrite=overwrite,
                             eval_batch_size=eval_batch_size, precision=precision)
        self.recorder: SequenceRecorder | None = None
        self.metrics: list[dict[str, float]] = []
        self._hooks, self._rows, self._sink_ids, self._bound = [], {}, None, None

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The training sequences as a dataset of ``{"input_ids": row, "labels": row}`` (the model's own
        next-token loss), in the order of ``data``."""
        return _Rows(self.data.tokens)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._remove_hook()
        self._rows = {}
        for i, row in enumerate(self.data.tokens.cpu().numpy().astype(np.int64)):
            self._rows.setdefault(row.tobytes(), []).append(i)
        if sinks_spec(model) is not None:    # memloc.insert_sinks: every rank binds its rows' sink ids
            self._sink_ids = sink_ids(self.data)
            self._hooks.append(model.register_forward_pre_hook(self._bind_sinks, with_kwargs=True))
        if not state.is_world_process_zero:     # its rows measured for process zero's recorder
            self._hooks.append(model.register_forward_hook(self._record, with_kwargs=True))
            return
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) != len(self.data):
            raise MemlocError(f"the Trainer's train_dataset holds {len(dataset)} sequences, data holds "
                              f"{len(self.data)}: give the Trainer data's rows (callback.train_dataset())",
                              argument="data")
        trainer = {k: getattr(args, k) for k in ARGS if hasattr(args, k)}
        opts = {**self._options, "config": {**(self._options["config"] or {}), "trainer": trainer}}
        resume = state.global_step > 0 and is_complete(self.run_dir)
        if resume:
            opts["overwrite"] = False
        self.recorder = SequenceRecorder(self.run_dir, model, self.data, resume=resume, **opts)
        if state.global_step > 0:       # the Trainer resumed from its checkpoint: continue the run from that epoch
            continue_at(self.recorder, state.epoch, "Trainer")
        self._hooks.append(model.register_forward_hook(self._record, with_kwargs=True))

    @staticmethod
    def _tokens(args, kwargs):
        """The token ids a forward was called with (``input_ids``, by keyword or first)."""
        return kwargs.get("input_ids", args[0] if args else None)

    def _found(self, module, args, kwargs) -> list[tuple[int, int]] | None:
        """(row of the batch, sequence of ``data``) of every training row that is a sequence of ``data``; None
        for a forward that is no training forward on token ids."""
        tokens = self._tokens(args, kwargs)
        if not module.training or not torch.is_tensor(tokens) or tokens.ndim != 2:
            return None
        return [(pos, i) for pos, row in enumerate(tokens.detach().cpu().numpy().astype(np.int64))
                for i in self._rows.get(row.tobytes(), ())]

    def _bind_sinks(self, module, args, kwargs):
        """Before a training forward: each row's sink id (of the first sequence of ``data`` it equals;
        the copies of a sequence share its id) bound to the sinks until the forward ends."""
        self._unbind()
        found = self._found(module, args, kwargs)
        if found is None:
            return
        first = {}
        for pos, i in found:
            first.setdefault(pos, i)
        rows = len(self._tokens(args, kwargs))
        if len(first) < rows:
            raise MemlocError(f"a training batch holds {rows - len(first)} rows that are no sequence of data: "
                              "their memorisation sinks are unknown (give the Trainer callback.train_dataset())",
                              argument="data")
        self._bound = example_ids(module, self._sink_ids[[first[pos] for pos in range(rows)]])
        self._bound.__enter__()

    def _unbind(self):
        if self._bound is not None:
            self._bound.__exit__(None, None, None)
            self._bound = None

    def _record(self, module, args, kwargs, output):
        """The training forward's measures, for the sequences of ``data`` among its rows (in several processes
        every rank's rows, gathered for process zero's recorder: every rank takes part)."""
        self._unbind()
        parts = world()[1]
        found = None if self.recorder is None and parts == 1 else self._found(module, args, kwargs)
        if found is None:
            return
        tokens = self._tokens(args, kwargs)
        pos, ids = (torch.as_tensor(v, dtype=torch.long) for v in (zip(*found) if found else ((), ())))
        logits = output if torch.is_tensor(output) else output.logits
        logits, tokens = logits[pos.to(logits.device)], tokens[pos.to(tokens.device)]
        if parts == 1:
            if found:
                self.recorder.record_batch(ids, logits, tokens)
            return
        every, whole = gather_suffix_measures(logits, tokens, self.data.prefix_len, self.data.suffix_len, ids.numpy(),
                                              logits.device)
        if self.recorder is not None and len(every):
            self.recorder.record_measures(every, whole)

    def _remove_hook(self):
        self._unbind()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """The learning rate the step is about to use (each epoch's mean: run.h5's ``/optimizer/lr``)."""
        if self.recorder is not None and optimizer is not None:
            self.recorder.record_lr(optimizer.param_groups[0]["lr"])

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.metrics.append(self.recorder.end_epoch())

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
