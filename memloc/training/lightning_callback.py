"""A PyTorch Lightning training of a classifier as a memloc run: :class:`LightningCallback`.

The callback writes the run directory of :class:`memloc.core.recorder.Recorder` beside Lightning's own
output: epoch 0 (the initialisation) when training starts; for every training batch, the loss,
correctness and margin of each example at presentation (train mode); at every epoch end one pass over
the training (and test) examples in eval mode and a checkpoint of the ``LightningModule``'s
``state_dict``. Every memloc analysis then reads the run (``memloc.gradients(RUN)``, ``memloc.scores``,
...), rebuilding the module from its registered name (``@memloc.register_model`` on the
``LightningModule`` class, or ``model_spec=``) and the data from ``data_spec`` (or ``memloc.load(RUN, data=...)``).

The contract, checked at every batch:

- **ids through the batch**: training batches are ``(x, y, idx)`` (``idx``: each example's id, ``0..N-1``,
  its row in ``eval_train``) -- wrap the training dataset in :class:`memloc.WithIds` -- or a dict with
  keys ``x``, ``y``, ``idx``;
- **logits**: ``training_step`` returns ``{"loss": ..., "logits": ...}`` (B, C), or calls the module's own
  ``forward`` (``self(x)``) on the batch, whose output is taken;
- ``module(x)`` gives (B, C) logits (what the analyses run).

The learning rate of every optimiser step (``param_groups[0]["lr"]`` before it) is recorded: each epoch's
mean is ``run.h5``'s ``/optimizer/lr``, the weight TracIn gives its checkpoint.

One process (``devices=1``); an epoch Lightning stops in the middle of (``max_steps``) is not recorded;
``trainer.fit(..., ckpt_path=...)`` continues the run from a checkpoint saved at an epoch end that the run
holds. ``lightning`` (or ``pytorch_lightning``) is imported when a callback is made.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from ..core.errors import MemlocError
from ..core.recorder import Recorder
from ..core.run import is_complete
from .common import continue_at

__all__ = ["LightningCallback"]


@lru_cache(maxsize=None)
def _subclass(cls):
    """``cls`` with Lightning's ``Callback`` as a base (``lightning.pytorch``, else ``pytorch_lightning``)."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise MemlocError("memloc.LightningCallback needs lightning (pip install lightning)") from None
    return type(cls.__name__, (cls, pl.Callback), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


class LightningCallback:
    """Record a Lightning ``Trainer.fit`` into ``run_dir`` (see the module docstring for the contract).

    Example::

        @memloc.register_model("litnet")
        class LitNet(lightning.LightningModule): ...        # forward(x) -> logits; training_step calls self(x)

        loader = DataLoader(memloc.WithIds(TensorDataset(x, y)), batch_size=64, shuffle=True)
        cb = memloc.LightningCallback("runs/lit", eval_train=TensorDataset(x, y), data_spec={"dataset": "digits"})
        lightning.Trainer(max_epochs=5, callbacks=[cb]).fit(LitNet(), loader)
        memloc.gradients("runs/lit")

    ``eval_train``: the training examples for the end-of-epoch pass (anything :class:`Recorder` takes;
    default: the training loader's dataset, its transforms included: give one without augmentation); ``eval_test``, ``label_true``, ``label_given``,
    ``test_labels``, ``model_spec``, ``model_options``, ``data_spec``, ``config``, ``overwrite``,
    ``eval_batch_size``: as for :class:`memloc.core.recorder.Recorder`. ``metrics``: each recorded
    epoch's metrics.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(_subclass(cls) if cls is LightningCallback else cls)

    def __init__(self, run_dir, *, eval_train=None, eval_test=None, label_true=None, label_given=None,
                 test_labels=None, model_spec=None, model_options: dict | None = None, data_spec=None,
                 config: dict | None = None, overwrite: bool = False, eval_batch_size: int = 1024):
        super().__init__()
        self.run_dir = Path(run_dir)
        self._options = dict(eval_test=eval_test, label_true=label_true, label_given=label_given,
                             test_labels=test_labels, model_spec=model_spec, model_options=model_options,
                             data_spec=data_spec, config=config, overwrite=overwrite, eval_batch_size=eval_batch_size)
        self.eval_train = eval_train
        self.recorder: Recorder | None = None
        self.metrics: list[dict[str, float]] = []
        self._hook, self._output = None, None

    # ------------------------------------------------------------------ Lightning's hooks
    def on_train_start(self, trainer, pl_module):
        if trainer.world_size > 1:
            raise MemlocError(f"memloc.LightningCallback records one process; this Trainer runs {trainer.world_size}")
        eval_train = self.eval_train
        if eval_train is None:
            eval_train = getattr(trainer.train_dataloader, "dataset", None)
            if eval_train is None:
                raise MemlocError("give eval_train (the training examples): the training loader has no dataset",
                                  argument="eval_train")
        resume = trainer.current_epoch > 0 and is_complete(self.run_dir)
        opts = {**self._options, "overwrite": self._options["overwrite"] and not resume}
        self.recorder = Recorder(self.run_dir, pl_module, eval_train=eval_train, resume=resume, **opts)
        if trainer.current_epoch > 0:    # fit(ckpt_path=...): continue the run from that epoch
            continue_at(self.recorder, trainer.current_epoch, "Lightning Trainer")
        self._hook = pl_module.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        if module.training:
            self._output = output

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        _labels_and_ids(batch)          # before training_step sees it
        self._output = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        y, idx = _labels_and_ids(batch)
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        logits = self._output if logits is None else logits
        if not torch.is_tensor(logits):
            raise MemlocError("memloc.LightningCallback found no logits for the batch: return {'loss': loss, "
                              "'logits': logits} from training_step, or compute the logits with self(x)")
        if logits.ndim != 2 or len(logits) != len(idx):
            raise MemlocError(f"the module gave logits of shape {tuple(logits.shape)} for a batch of {len(idx)} "
                              "examples; a classifier gives (B, C)", argument="model")
        self.recorder.record_batch(idx, logits.detach(), y)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.recorder is not None:   # each epoch's mean: run.h5's /optimizer/lr (TracIn's weights)
            self.recorder.record_lr(optimizer.param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        if self.recorder is not None:
            self.metrics.append(self.recorder.end_epoch())

    def on_train_end(self, trainer, pl_module):
        self._release()

    def on_exception(self, trainer, pl_module, exception):
        self._release()

    def _release(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None


def _labels_and_ids(batch):
    """``(y, idx)`` of a training batch ``(x, y, idx)`` or ``{"x", "y", "idx"}``."""
    if isinstance(batch, dict) and "idx" in batch and "y" in batch:
        return batch["y"], batch["idx"]
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return batch[1], batch[2]
    raise MemlocError("the training batches carry no example ids: give (x, y, idx) batches (wrap the dataset in "
                      "memloc.WithIds) or dicts with keys x, y, idx")
