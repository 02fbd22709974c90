"""The run directory: :class:`Recorder` writes it from any training loop, :func:`load` reads it.

Layout (see DESIGN.md)::

    RUN/run.json                         config, model spec, sizes, memloc version
    RUN/run.h5                           /examples, /test, /dynamics, /metrics (schema "memloc.run")
    RUN/checkpoints/epoch_0000.pt ...    model state_dict per epoch (0 = initialisation), atomic
    RUN/results/<analysis>.h5            one file per analysis

``run.h5``: ``/examples/{index, source_index, label_true, label_given, is_noisy}`` (N,) for the
training examples; ``/test/{index, source_index, label}`` (M,);
``/dynamics/{presentation,end}/{loss, correct, margin}`` (epoch, N) -- at presentation (train mode,
the last time an example was seen during that epoch; row 0 and unseen examples are NaN / -1) and
at epoch end (eval mode, row 0 = initialisation); ``margin`` = given-label logit minus the
largest other logit; ``/metrics/<name>`` (epoch,) for train / clean / noisy / test accuracy and
test loss. ``correct`` is int8 (1, 0, or -1 = not presented).
"""
from __future__ import annotations

import datetime
import json
import os
import pickle
from pathlib import Path
from typing import Callable, Iterable

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cli import UserError
from .h5 import put, write_root_attrs

__all__ = ["Recorder", "Run", "load", "save_atomic", "per_example_stats", "evaluate", "accuracies",
           "SUBSETS"]

DYN_NAMES = ("loss", "correct", "margin")
METRICS = ("train_accuracy", "clean_accuracy", "noisy_accuracy", "noisy_true_accuracy",
           "test_accuracy", "test_loss")


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``PATH.tmp`` then ``os.replace``: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def per_example_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy loss, correctness and margin (label logit - best other logit), each (B,)."""
    logits = logits.detach().float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    label_logit = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return {"loss": loss, "correct": (logits.argmax(1) == labels), "margin": label_logit - other}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable) -> dict[str, np.ndarray]:
    """Per-example stats of ``model`` (in eval mode) over ``(x, y, idx)`` batches, ordered as given.

    Returns ``{"idx", "loss", "correct", "margin", "pred"}`` numpy arrays.
    """
    was_training = model.training
    model.eval()
    out: dict[str, list] = {k: [] for k in ("idx", "loss", "correct", "margin", "pred")}
    try:
        for x, y, idx in batches:
            logits = model(x)
            stats = per_example_stats(logits, y)
            stats.update(idx=idx, pred=logits.argmax(1))
            for k in out:
                out[k].append(stats[k].cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in out.items()}


SUBSETS = ("clean", "noisy", "noisy_true", "test")


def accuracies(model: nn.Module, data, *, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy of ``model`` (eval mode) on the standard subsets of a :class:`memloc.data.Data`.

    ``clean``: clean training examples; ``noisy``: noisy training examples w.r.t. their given
    (wrong) labels, i.e. the fraction still memorised; ``noisy_true``: noisy examples w.r.t. their
    true labels; ``test``: the test set. Keys are :data:`SUBSETS`.
    """
    train = evaluate(model, data.train.batches(batch_size))
    order = np.argsort(train["idx"])
    pred, correct = train["pred"][order], train["correct"][order].astype(bool)
    noisy = data.is_noisy
    test = evaluate(model, data.test.batches(batch_size))
    return {"clean": _mean(correct[~noisy]), "noisy": _mean(correct[noisy]),
            "noisy_true": _mean(pred[noisy] == data.label_true[noisy]), "test": _mean(test["correct"])}


def _batches(data, batch_size):
    """Re-iterable (x, y, idx) batches from an ExampleSet or any re-iterable of batches."""
    return data.batches(batch_size) if hasattr(data, "batches") else iter(data)


class Recorder:
    """Write the memloc run format from your own training loop.

    Example::

        rec = Recorder("runs/a", model, eval_train=train_set, eval_test=test_set,
                       label_true=y_true, label_given=y_given)      # saves epoch 0
        for epoch in range(epochs):
            for x, y, idx in loader:
                logits = model(x); ...; rec.record_batch(idx, logits, y)
            rec.end_epoch()                                            # evaluates, checkpoints

    ``eval_train`` / ``eval_test``: an :class:`memloc.data.ExampleSet` or a re-iterable of
    ``(x, y, idx)`` batches (``y`` = given labels for train, true labels for test; ``idx`` =
    example ids ``0..N-1``). ``resume=True`` reopens an existing run at its last complete epoch
    and loads that checkpoint into ``model``.
    """

    def __init__(self, run_dir, model: nn.Module, *, eval_train, label_true, label_given=None,
                 eval_test=None, test_labels=None, config: dict | None = None,
                 model_spec: dict | None = None, resume: bool = False, eval_batch_size: int = 1024,
                 source_index: dict | None = None, argv=None):
        self.dir = Path(run_dir)
        self.model = model
        self.eval_train, self.eval_test = eval_train, eval_test
        self.eval_batch_size = eval_batch_size
        self.label_true = np.asarray(label_true, dtype=np.int64)
        self.label_given = self.label_true if label_given is None else np.asarray(label_given, dtype=np.int64)
        self.is_noisy = self.label_given != self.label_true
        self.n = len(self.label_true)
        self._presentation = self._empty()
        self.h5_path = self.dir / "run.h5"
        self.ckpt_dir = self.dir / "checkpoints"
        if resume and (self.dir / "run.json").exists():
            self.epoch = self._last_complete_epoch()
            self.rewind_to(self.epoch)
            return
        if self.dir.exists() and any(self.dir.iterdir()):
            raise UserError(f"run directory {str(self.dir)!r} already exists and is not empty "
                            "(use --resume to continue it, or choose a new directory)")
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        info = {"memloc_version": _version(), "created": _now(), "config": config or {},
                "model": model_spec or {"spec": None, "class": f"{type(model).__module__}.{type(model).__qualname__}"},
                "num_train": self.n, "num_test": None if test_labels is None else len(test_labels)}
        (self.dir / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        self._create_h5(config or {}, test_labels, source_index or {}, argv)
        self.epoch = 0
        self._finish_epoch()

    # ------------------------------------------------------------------ writing
    def _empty(self):
        return {"loss": np.full(self.n, np.nan, np.float32), "correct": np.full(self.n, -1, np.int8),
                "margin": np.full(self.n, np.nan, np.float32)}

    def _create_h5(self, config, test_labels, source_index, argv):
        with h5py.File(self.h5_path, "w") as f:
            write_root_attrs(f, "memloc.run", config, argv)
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
            for when in ("presentation", "end"):
                g = f.create_group(f"dynamics/{when}")
                for k, v in self._empty().items():
                    put(g, k, v[None][:0], dims=["epoch", "example"], maxshape=(None, self.n))
            g = f.create_group("metrics")
            for k in METRICS:
                put(g, k, np.zeros(0, np.float64), dims=["epoch"], maxshape=(None,))

    def record_batch(self, idx, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record per-example loss / correctness / margin of a training batch (train-mode logits)."""
        stats = per_example_stats(logits, labels)
        rows = torch.as_tensor(idx).cpu().numpy()
        for k in DYN_NAMES:
            self._presentation[k][rows] = stats[k].cpu().numpy()

    def end_epoch(self) -> dict[str, float]:
        """Evaluate at epoch end, append the epoch's dynamics, save the checkpoint; returns metrics."""
        self.epoch += 1
        return self._finish_epoch()

    def _finish_epoch(self) -> dict[str, float]:
        end = evaluate(self.model, _batches(self.eval_train, self.eval_batch_size))
        if len(end["idx"]) != self.n or not np.array_equal(np.sort(end["idx"]), np.arange(self.n)):
            raise ValueError(f"eval_train must yield every example id 0..{self.n - 1} exactly once")
        order = np.argsort(end["idx"])
        end_rows = {k: end[k][order] for k in DYN_NAMES}
        end_rows["correct"] = end_rows["correct"].astype(np.int8)
        c = end_rows["correct"].astype(bool)
        pred = end["pred"][order]
        metrics = {"train_accuracy": c.mean(), "clean_accuracy": _mean(c[~self.is_noisy]),
                   "noisy_accuracy": _mean(c[self.is_noisy]),
                   "noisy_true_accuracy": _mean(pred[self.is_noisy] == self.label_true[self.is_noisy]),
                   "test_accuracy": np.nan, "test_loss": np.nan}
        if self.eval_test is not None:
            t = evaluate(self.model, _batches(self.eval_test, self.eval_batch_size))
            metrics.update(test_accuracy=t["correct"].mean(), test_loss=t["loss"].mean())
        with h5py.File(self.h5_path, "a") as f:
            for when, rows in (("presentation", self._presentation), ("end", end_rows)):
                for k in DYN_NAMES:
                    ds = f[f"dynamics/{when}/{k}"]
                    ds.resize(self.epoch + 1, axis=0)
                    ds[self.epoch] = rows[k]
            for k in METRICS:
                ds = f[f"metrics/{k}"]
                ds.resize(self.epoch + 1, axis=0)
                ds[self.epoch] = metrics[k]
        save_atomic(self.model.state_dict(), self.ckpt_dir / f"epoch_{self.epoch:04d}.pt")
        self._presentation = self._empty()
        return {k: float(v) for k, v in metrics.items()}

    # ------------------------------------------------------------------ resuming
    def _last_complete_epoch(self) -> int:
        with _open_h5(self.h5_path) as f:
            rows = f["dynamics/end/loss"].shape[0]
        ckpts = _checkpoint_epochs(self.ckpt_dir)
        done = [e for e in ckpts if e < rows]
        if not done:
            raise UserError(f"{str(self.dir)!r} has no complete epoch to resume from")
        return max(done)

    def rewind_to(self, epoch: int) -> None:
        """Forget everything after ``epoch``: truncate dynamics, delete later checkpoints, load ``epoch``."""
        with h5py.File(self.h5_path, "a") as f:
            for when in ("presentation", "end"):
                for k in DYN_NAMES:
                    f[f"dynamics/{when}/{k}"].resize(epoch + 1, axis=0)
            for k in METRICS:
                f[f"metrics/{k}"].resize(epoch + 1, axis=0)
        for e in _checkpoint_epochs(self.ckpt_dir):
            if e > epoch:
                (self.ckpt_dir / f"epoch_{e:04d}.pt").unlink()
        self.model.load_state_dict(_load_ckpt(self.ckpt_dir / f"epoch_{epoch:04d}.pt"))
        self.epoch = epoch
        self._presentation = self._empty()


# ---------------------------------------------------------------------- reading
def _mean(a) -> float:
    return float(np.mean(a)) if len(a) else float("nan")


def _version() -> str:
    from . import __version__
    return __version__


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _checkpoint_epochs(ckpt_dir: Path) -> list[int]:
    out = []
    for p in Path(ckpt_dir).glob("epoch_*.pt"):
        try:
            out.append(int(p.stem.split("_")[1]))
        except (IndexError, ValueError):
            continue
    return sorted(out)


def _open_h5(path: Path):
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise UserError(f"cannot read {str(path)!r}: {e}") from None


def _load_ckpt(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"checkpoint {str(path)!r} is corrupt or unreadable ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


class Run:
    """A run directory opened for analysis (see :func:`load`)."""

    def __init__(self, path, *, model_fn: Callable[[], nn.Module] | None = None, data=None):
        self.path = Path(path)
        if not (self.path / "run.json").is_file():
            raise UserError(f"{str(self.path)!r} is not a memloc run directory (no run.json)")
        try:
            self.info = json.loads((self.path / "run.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{str(self.path / 'run.json')!r} is corrupt: {e}") from None
        self.config: dict = self.info.get("config", {})
        self._model_fn, self._data = model_fn, data
        with _open_h5(self.path / "run.h5") as f:
            ex = f["examples"]
            self.label_true = ex["label_true"][:]
            self.label_given = ex["label_given"][:]
            self.is_noisy = ex["is_noisy"][:].astype(bool)

    def __repr__(self):
        return f"Run({str(self.path)!r}, epochs={self.epochs[-1] if self.epochs else None}, N={self.num_train})"

    @property
    def num_train(self) -> int:
        return len(self.label_true)

    @property
    def epochs(self) -> list[int]:
        """Epochs with a checkpoint (0 = initialisation)."""
        return _checkpoint_epochs(self.path / "checkpoints")

    @property
    def final_epoch(self) -> int:
        if not self.epochs:
            raise UserError(f"run {str(self.path)!r} has no checkpoints")
        return self.epochs[-1]

    def results_path(self, name: str) -> Path:
        return self.path / "results" / f"{name}.h5"

    def checkpoint(self, epoch: int | None = None) -> dict:
        """The model state_dict at ``epoch`` (default: final), loaded with ``weights_only=True``."""
        epoch = self.final_epoch if epoch is None else int(epoch)
        if epoch not in self.epochs:
            raise UserError(f"run {str(self.path)!r} has no checkpoint for epoch {epoch} "
                            f"(available: {_ranges(self.epochs)})")
        return _load_ckpt(self.path / "checkpoints" / f"epoch_{epoch:04d}.pt")

    def build_model(self) -> nn.Module:
        """A freshly constructed (randomly initialised) model of this run's architecture."""
        if self._model_fn is not None:
            return self._model_fn()
        spec = self.info.get("model", {})
        if not spec.get("spec"):
            raise UserError(f"run {str(self.path)!r} was recorded from a custom model "
                            f"({spec.get('class')}); pass model_fn= to memloc.run.load")
        from .models import build_model
        model = build_model(spec["spec"], spec["in_shape"], spec["num_classes"], **spec.get("options", {}))
        if spec.get("etd"):  # example-tied dropout layers (memloc.train --etd-after)
            from .dropout import insert_example_tied_dropout
            insert_example_tied_dropout(model, **spec["etd"])
        return model

    def model(self, epoch: int | None = None, device="cpu") -> nn.Module:
        """The model with the checkpoint of ``epoch`` (default final) loaded, in eval mode."""
        m = self.build_model()
        m.load_state_dict(self.checkpoint(epoch))
        return m.to(device).eval()

    def data(self, device="cpu"):
        """The run's :class:`memloc.data.Data`, rebuilt from its config and checked against run.h5."""
        if self._data is None:
            if "dataset" not in self.config:
                raise UserError(f"run {str(self.path)!r} does not name a built-in dataset; pass data= to load")
            from .data import build_data
            self._data = build_data(self.config)
            if not (np.array_equal(self._data.label_given, self.label_given)
                    and np.array_equal(self._data.label_true, self.label_true)):
                raise UserError(f"the dataset rebuilt for {str(self.path)!r} does not match its stored labels")
        return self._data.to(device)

    def dynamics(self, name: str, when: str = "end") -> np.ndarray:
        """``/dynamics/<when>/<name>`` as an (epoch, N) array (when: presentation | end)."""
        with _open_h5(self.path / "run.h5") as f:
            key = f"dynamics/{when}/{name}"
            if key not in f:
                raise UserError(f"run.h5 has no {key!r}; valid: {', '.join(f'dynamics/{w}/{n}' for w in ('presentation', 'end') for n in DYN_NAMES)}")
            return f[key][:]

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-epoch metrics (train / clean / noisy / test accuracy, test loss)."""
        with _open_h5(self.path / "run.h5") as f:
            return {k: f[f"metrics/{k}"][:] for k in f["metrics"]}


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    return f"{xs[0]}..{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))


def load(path, *, model_fn: Callable[[], nn.Module] | None = None, data=None) -> Run:
    """Open a run directory. ``model_fn`` / ``data`` are needed only for runs of custom models / data."""
    return Run(path, model_fn=model_fn, data=data)
