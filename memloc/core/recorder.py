"""The run directory, write side: :class:`Recorder` writes the memloc run format from any loop.

:class:`RunWriter` is what every writer shares (the writer lock, ``run.json``, ``run.h5`` appended epoch
by epoch through an atomic copy, checkpoints, resuming and rewinding); :class:`Recorder` writes a
classifier's run, :class:`memloc.core.sequence_recorder.SequenceRecorder` a language model's.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from .errors import MemlocError
from .evaluate import eval_mode, evaluate, nanmean, per_example_stats, subset_accuracies
from .h5 import put, write_root_attrs
from .inputs import as_batches
from .learning_rates import StepRates, create_lrs, truncate_lrs, write_lr
from .models import import_path_of, model_name_of
from .run import (CREATING, DYN_NAMES, METRICS, check_new_run_dir, checkpoint_epochs, clear_run_dir,
                  epochs_complete, is_complete, load_checkpoint, open_h5, save_atomic)
from .runtime import FileLock, atomic_path, check_range, make_dir

__all__ = ["RunWriter", "Recorder"]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class RunWriter:
    """The part of a run's writer that does not depend on what is trained (see the module docstring).

    A subclass sets :attr:`DYNAMICS` (per-example dynamics: name -> (dtype, value for "not
    presented")) and :attr:`METRIC_NAMES`, and implements :meth:`_describe` (``run.json``'s model /
    data entries), :meth:`_write_examples` (``run.h5``'s ``/examples`` and ``/test``) and
    :meth:`_evaluate_epoch` (the end-of-epoch rows and metrics); its ``__init__`` checks its inputs,
    sets ``self.n`` (training examples) and calls :meth:`_start`.
    """

    DYNAMICS: dict = {}
    METRIC_NAMES: tuple = ()

    def _start(self, run_dir, model: nn.Module, *, resume: bool, overwrite: bool, config, argv, evaluated,
               optimizer=None):
        """Take the writer lock, then resume the run or create it (epoch 0 recorded). ``optimizer``: read
        its learning rate before each step (:mod:`memloc.core.learning_rates`)."""
        self._rates = StepRates(optimizer)         # checks it; follows its steps once the run is open
        self.dir = Path(run_dir)
        self.model = model
        self._presentation = self._empty()
        self.h5_path = self.dir / "run.h5"
        self.ckpt_dir = self.dir / "checkpoints"
        if not (resume and is_complete(self.dir)) and not overwrite:
            check_new_run_dir(self.dir, clear=False)    # a finished run: "already exists", before the lock
        make_dir(self.dir)
        self.lock = FileLock(self.dir / "writer.lock", f"run {str(self.dir)!r} is being written by another "
                             "process (training or resuming it)", take_over_own=True)
        try:
            self._open(resume, overwrite, config, argv, evaluated)
        except BaseException:
            self.lock.release()
            raise
        self._rates.start()

    def _open(self, resume, overwrite, config, argv, evaluated):
        """Resume the run, or create it (under the writer lock)."""
        if resume and is_complete(self.dir) and not overwrite:
            self.epoch = self._last_complete_epoch()
            self.rewind_to(self.epoch)
            return
        if overwrite:
            clear_run_dir(self.dir)
        check_new_run_dir(self.dir)
        (self.dir / CREATING).touch()           # until epoch 0 is complete: a kill before that is redone
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        info = {"memloc_version": _version(), "created": _now(), "config": config or {}, "num_train": self.n,
                **self._describe()}
        with atomic_path(self.dir / "run.json") as tmp:
            tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        self._create_h5(config or {}, argv)
        self.epoch = 0
        self._finish_epoch(evaluated)
        (self.dir / CREATING).unlink()

    def _describe(self) -> dict:
        raise NotImplementedError

    def _write_examples(self, f) -> None:
        raise NotImplementedError

    def _evaluate_epoch(self, evaluated) -> tuple[dict, dict]:
        raise NotImplementedError

    def _empty(self):
        return {k: np.full(self.n, fill, dtype) for k, (dtype, fill) in self.DYNAMICS.items()}

    def _create_h5(self, config, argv):
        with atomic_path(self.h5_path) as tmp, h5py.File(tmp, "w", locking=False) as f:
            write_root_attrs(f, "memloc.run", config, argv)
            f.attrs["epochs_complete"] = -1
            self._write_examples(f)
            for when in ("presentation", "end"):
                g = f.create_group(f"dynamics/{when}")
                for k, v in self._empty().items():
                    put(g, k, v[None][:0], dims=["epoch", "example"], maxshape=(None, self.n))
            g = f.create_group("metrics")
            for k in self.METRIC_NAMES:
                put(g, k, np.zeros(0, np.float64), dims=["epoch"], maxshape=(None,))
            create_lrs(f)

    def end_epoch(self, evaluated: dict | None = None) -> dict[str, float]:
        """Evaluate at epoch end, append the epoch's dynamics, save the checkpoint; returns metrics."""
        self.epoch += 1
        return self._finish_epoch(evaluated)

    def _finish_epoch(self, evaluated: dict | None = None) -> dict[str, float]:
        end_rows, metrics = self._evaluate_epoch(evaluated)
        save_atomic(self.model.state_dict(), self.ckpt_dir / f"epoch_{self.epoch:04d}.pt")   # before its rows
        with self._edit_h5() as f:
            for when, rows in (("presentation", self._presentation), ("end", end_rows)):
                for k in self.DYNAMICS:
                    ds = f[f"dynamics/{when}/{k}"]
                    ds.resize(self.epoch + 1, axis=0)
                    ds[self.epoch] = rows[k]
            for k in self.METRIC_NAMES:
                ds = f[f"metrics/{k}"]
                ds.resize(self.epoch + 1, axis=0)
                ds[self.epoch] = metrics[k]
            write_lr(f, self.epoch, self._rates.take())
            f.attrs["epochs_complete"] = self.epoch
        self._presentation = self._empty()
        return {k: float(v) for k, v in metrics.items()}

    @contextlib.contextmanager
    def _edit_h5(self):
        """run.h5 opened for appending -- as a copy that replaces it atomically on success, so readers
        never see a file being modified and a kill leaves the previous epoch's file."""
        with atomic_path(self.h5_path) as tmp:
            shutil.copyfile(self.h5_path, tmp)
            with h5py.File(tmp, "a", locking=False) as f:
                yield f

    def set_config(self, config: dict) -> None:
        """Replace the training config the run stores (``run.json`` and ``run.h5``'s root attribute), e.g. a
        trainer extending its epochs; the run's fingerprint changes with it, so results computed before
        are refused as another run's (:meth:`memloc.Run.result`)."""
        info = json.loads((self.dir / "run.json").read_text())
        info["config"] = config
        with atomic_path(self.dir / "run.json") as tmp:
            tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        with self._edit_h5() as f:
            f.attrs["config"] = json.dumps(config, sort_keys=True, default=str)

    def record_lr(self, lr) -> None:
        """Record the learning rate of one optimiser step of the current epoch (call it at every step, or
        give the writer ``optimizer=``): run.h5's ``/optimizer/lr`` holds each epoch's mean, TracIn's weights."""
        self._rates.record(lr)

    def close(self) -> None:
        """Release the run directory for other writers (also when this object is garbage collected)."""
        self._rates.close()
        self.lock.release()

    # ------------------------------------------------------------------ resuming
    def _last_complete_epoch(self) -> int:
        with open_h5(self.h5_path) as f:
            rows = epochs_complete(f) + 1
        done = [e for e in checkpoint_epochs(self.ckpt_dir) if e < rows]
        if not done:
            raise MemlocError(f"{str(self.dir)!r} has no complete epoch to resume from")
        return max(done)

    def rewind_to(self, epoch: int) -> None:
        """Forget everything after ``epoch``: truncate dynamics, delete later checkpoints, load ``epoch``."""
        with self._edit_h5() as f:
            f.attrs["epochs_complete"] = epoch
            for when in ("presentation", "end"):
                for k in self.DYNAMICS:
                    f[f"dynamics/{when}/{k}"].resize(epoch + 1, axis=0)
            for k in self.METRIC_NAMES:
                f[f"metrics/{k}"].resize(epoch + 1, axis=0)
            truncate_lrs(f, epoch)
        for e in checkpoint_epochs(self.ckpt_dir):
            if e > epoch:
                (self.ckpt_dir / f"epoch_{e:04d}.pt").unlink()
        self.model.load_state_dict(load_checkpoint(self.ckpt_dir / f"epoch_{epoch:04d}.pt"))
        self.epoch = epoch
        self._presentation = self._empty()
        self._rates.take()


class Recorder(RunWriter):
    """Write the memloc run format from your own training loop.

    Example::

        loader = DataLoader(memloc.WithIds(train_set), batch_size=128, shuffle=True)
        rec = memloc.Recorder("runs/a", model, eval_train=train_set, eval_test=test_set,
                              label_true=y_true, model_spec="mynet")   # saves epoch 0
        for epoch in range(epochs):
            for x, y, idx in loader:
                logits = model(x); ...; rec.record_batch(idx, logits, y)
            rec.end_epoch()                                            # evaluates, checkpoints

    ``eval_train`` / ``eval_test``: anything :func:`memloc.core.inputs.as_batches` accepts (a torch
    ``Dataset`` or ``DataLoader`` of ``(x, y[, idx])``, tensors ``(x, y[, idx])``, an ExampleSet);
    ``y`` = given labels for train, true labels for test; ids (positions when absent) ``0..N-1``.
    ``label_given`` (N,): default the labels ``eval_train`` yields; ``label_true`` (N,): default
    ``label_given`` (no known noise). ``model_spec``: a :func:`memloc.register_model` name or ``pkg.module:factory`` (with
    ``model_options``) so every analysis and command can rebuild the model; ``data_spec``: a
    built-in dataset config, a :func:`memloc.register_data` name or ``pkg.module:factory`` so they
    can rebuild the data. ``resume=True`` reopens an existing run at its last complete epoch and
    loads that checkpoint into ``model``. ``evaluated``: a new run's epoch-0 evaluation done
    elsewhere (see :meth:`end_epoch`). ``optimizer``: the ``torch.optim`` optimiser of the loop, whose
    learning rate before every step is recorded (each epoch's mean in ``run.h5``'s ``/optimizer/lr``:
    TracIn's weights; :meth:`record_lr` for another optimiser; neither: TracIn weights checkpoints 1).
    """

    DYNAMICS = {"loss": (np.float32, np.nan), "correct": (np.int8, -1), "margin": (np.float32, np.nan)}
    METRIC_NAMES = METRICS

    def __init__(self, run_dir, model: nn.Module, *, eval_train, label_true=None, label_given=None,
                 eval_test=None, test_labels=None, config: dict | None = None,
                 model_spec: str | dict | None = None, model_options: dict | None = None,
                 data_spec: str | dict | None = None, resume: bool = False, overwrite: bool = False,
                 eval_batch_size: int = 1024, source_index: dict | None = None, argv=None,
                 evaluated: dict | None = None, optimizer=None):
        eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
        self.eval_batch_size = eval_batch_size
        device = next((p.device for p in model.parameters()), torch.device("cpu"))   # batches go to the model
        self.eval_train = as_batches(eval_train, batch_size=eval_batch_size, name="eval_train", device=device)
        self.eval_test = None if eval_test is None else as_batches(eval_test, batch_size=eval_batch_size,
                                                                   name="eval_test", device=device)
        if label_given is None:     # the labels the training examples carry
            label_given = self._labels(self.eval_train)
        self.label_given = np.asarray(label_given, dtype=np.int64)
        self.label_true = self.label_given if label_true is None else np.asarray(label_true, dtype=np.int64)
        if self.label_true.shape != self.label_given.shape or self.label_true.ndim != 1:
            raise MemlocError(f"label_true {self.label_true.shape} and label_given {self.label_given.shape} "
                              "must be vectors of the same length")
        if test_labels is None and self.eval_test is not None:
            test_labels = self._labels(self.eval_test)
        self.is_noisy = self.label_given != self.label_true
        self.n = len(self.label_true)
        self._spec = (model_spec, model_options, data_spec)
        self._test_labels, self._source_index = test_labels, source_index or {}
        self._start(run_dir, model, resume=resume, overwrite=overwrite, config=config, argv=argv, evaluated=evaluated,
                    optimizer=optimizer)

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _labels(batches) -> np.ndarray:
        return evaluate_labels(batches)

    def _describe(self) -> dict:
        model_spec, model_options, data_spec = self._spec
        out = {"model": self._model_spec(self.model, model_spec, model_options),
               "num_test": None if self._test_labels is None else len(self._test_labels)}
        if data_spec is not None:
            out["data"] = {"dataset": data_spec} if isinstance(data_spec, str) else dict(data_spec)
        return out

    def _model_spec(self, model, spec, options) -> dict:
        cls = f"{type(model).__module__}.{type(model).__qualname__}"
        x = next(iter(self.eval_train.batches(2)))[0]
        with torch.no_grad(), eval_mode(model):      # what a factory naming in_shape / num_classes gets
            shape = {"in_shape": list(x.shape[1:]), "num_classes": int(model(x[:1]).shape[-1])}
        if isinstance(spec, dict):
            return {"class": cls, **shape,
                    **({"import": import_path_of(spec["spec"])} if import_path_of(spec.get("spec", "")) else {}),
                    **spec}
        name = spec if spec is not None else model_name_of(model)
        out = {"spec": name, "options": dict(options or {}), "class": cls, **shape}
        if name is not None and import_path_of(name):
            out["import"] = import_path_of(name)     # for commands in a process that did not register it
        return out

    def _write_examples(self, f) -> None:
        test_labels, source_index = self._test_labels, self._source_index
        ex = f.create_group("examples")
        put(ex, "index", np.arange(self.n), dims=["example"])
        put(ex, "source_index", source_index.get("train", np.arange(self.n)), dims=["example"])
        put(ex, "label_true", self.label_true, dims=["example"])
        put(ex, "label_given", self.label_given, dims=["example"])
        put(ex, "is_noisy", self.is_noisy, dims=["example"])
        if test_labels is not None:
            te = f.create_group("test")
            m = len(test_labels)
            put(te, "index", np.arange(m), dims=["example"])
            put(te, "source_index", source_index.get("test", np.arange(m)), dims=["example"])
            put(te, "label", np.asarray(test_labels, dtype=np.int64), dims=["example"])

    def record_batch(self, idx, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record per-example loss / correctness / margin of a training batch (train-mode logits).

        ``idx``, ``logits`` (B, C) and ``labels`` (B,) may be tensors or numpy arrays; ids must lie in
        0..n-1 and labels in 0..C-1 (a :class:`MemlocError` names what is wrong)."""
        logits, labels, rows = _checked_batch(idx, logits, labels, self.n)
        stats = per_example_stats(logits, labels)
        for k in DYN_NAMES:
            self._presentation[k][rows] = stats[k].cpu().numpy()

    def end_epoch(self, evaluated: dict | None = None) -> dict[str, float]:
        """Evaluate at epoch end, append the epoch's dynamics, save the checkpoint; returns metrics.

        ``evaluated``: the end-of-epoch passes done elsewhere (e.g. split across processes), as
        ``{"train": ..., "test": ...}`` outputs of :func:`memloc.core.evaluate.evaluate` over ``eval_train``
        / ``eval_test`` with this model; None: the Recorder evaluates."""
        return super().end_epoch(evaluated)

    def _evaluate_epoch(self, evaluated) -> tuple[dict, dict]:
        end = (evaluated["train"] if evaluated is not None
               else evaluate(self.model, self.eval_train.batches(self.eval_batch_size)))
        if len(end["idx"]) != self.n or not np.array_equal(np.sort(end["idx"]), np.arange(self.n)):
            raise MemlocError(f"eval_train must yield every example id 0..{self.n - 1} exactly once "
                              f"(got {len(end['idx'])} examples)")
        order = np.argsort(end["idx"])
        end_rows = {k: end[k][order] for k in DYN_NAMES}
        end_rows["correct"] = end_rows["correct"].astype(np.int8)
        acc = subset_accuracies(end_rows["correct"], end["pred"][order], self.is_noisy, self.label_true)
        metrics = {"train_accuracy": nanmean(end_rows["correct"]), **{f"{k}_accuracy": v for k, v in acc.items()},
                   "test_accuracy": np.nan, "test_loss": np.nan}
        if self.eval_test is not None:
            t = (evaluated["test"] if evaluated is not None
                 else evaluate(self.model, self.eval_test.batches(self.eval_batch_size)))
            metrics.update(test_accuracy=nanmean(t["correct"]), test_loss=nanmean(t["loss"]))
        return end_rows, metrics


def _integers(name: str, values, device=None) -> torch.Tensor:
    try:
        t = torch.as_tensor(values, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise MemlocError(f"record_batch: {name} must be a tensor or array of integers, "
                          f"got {type(values).__name__}") from None
    if t.numel() == 0:
        return t.long()                 # an empty batch ([] is typed as float)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise MemlocError(f"record_batch: {name} must hold integers, got dtype {t.dtype}")
    return t.long()


def _checked_batch(idx, logits, labels, n: int):
    """``(logits, labels, ids)`` of a recorded batch, checked: (B, C) float logits, B labels in 0..C-1,
    B ids in 0..n-1."""
    try:
        logits = torch.as_tensor(logits)
    except (TypeError, ValueError, RuntimeError):
        raise MemlocError(f"record_batch: logits must be a tensor or array, got {type(logits).__name__}") from None
    if logits.ndim != 2 or not logits.dtype.is_floating_point:
        raise MemlocError(f"record_batch: logits must be floating point of shape (batch, classes), "
                          f"got {logits.dtype} of shape {tuple(logits.shape)}")
    labels, rows = _integers("labels", labels, logits.device), _integers("idx", idx).cpu().numpy()
    b, c = logits.shape
    if labels.shape != (b,):
        raise MemlocError(f"record_batch: labels must hold one label per row of logits ({b}), "
                          f"got shape {tuple(labels.shape)}")
    low, high = torch.stack(torch.aminmax(labels)).tolist() if b else (0, 0)     # one device sync per batch
    if low < 0 or high >= c:
        raise MemlocError(f"record_batch: labels must lie in 0..{c - 1} (logits have {c} classes), got {low}..{high}")
    if rows.shape != (b,) or (b and (rows.min() < 0 or rows.max() >= n)):
        raise MemlocError(f"record_batch: idx must hold one example id in 0..{n - 1} per row of logits")
    return logits, labels, rows


def evaluate_labels(batches) -> np.ndarray:
    """The labels ``y`` of ``(x, y, idx)`` batches, ordered by id (one pass, no model)."""
    ys, ids = [], []
    for _, y, idx in batches.batches(4096):
        ys.append(torch.as_tensor(y).cpu())
        ids.append(torch.as_tensor(idx).cpu())
    if not ys:
        return np.zeros(0, np.int64)
    y, idx = torch.cat(ys).numpy(), torch.cat(ids).numpy()
    out = np.empty(len(y), np.int64)
    if not np.array_equal(np.sort(idx), np.arange(len(y))):
        raise MemlocError("the examples must carry every id 0..N-1 exactly once")
    out[idx] = y
    return out


def _version() -> str:
    from . import __version__
    return __version__
