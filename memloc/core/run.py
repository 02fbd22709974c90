"""The run directory, read side: :func:`load` opens it as a :class:`Run` (the writer is
:class:`memloc.core.recorder.Recorder`).

Layout (see DESIGN.md)::

    RUN/run.json                         config, model spec, data spec, sizes, memloc version
    RUN/run.h5                           /examples, /test, /dynamics, /metrics (schema "memloc.run")
    RUN/checkpoints/epoch_0000.pt ...    model state_dict per epoch (0 = initialisation), atomic
    RUN/results/<analysis>.h5            one result file per analysis (memloc.core.results)

``run.h5``: ``/examples/{index, source_index, label_true, label_given, is_noisy}`` (N,) for the training examples; ``/test/{index, source_index, label}`` (M,);
``/dynamics/{presentation,end}/{loss, correct, margin}`` (epoch, N) -- at the example's last presentation
in that epoch (train mode; row 0 and unseen examples NaN / -1) and at epoch end (eval mode, row 0 =
initialisation); ``margin`` = given-label logit minus the largest other logit; ``/metrics/<name>`` (epoch,)
for train / clean / noisy / test accuracy and test loss. ``correct`` is int8 (1, 0, or -1 = not presented).

A language model's run (``run.json`` ``"kind": "lm"``, written by
:class:`memloc.core.sequence_recorder.SequenceRecorder`) keeps the layout with sequences for
examples: ``/examples/{index, source_index, is_noisy (= is the sequence a memorisation target),
kind, copy_of, tokens (N, T)}``, ``/test/{index, tokens (M, T)}``, ``/dynamics/{presentation,end}/
{suffix_loss, suffix_accuracy, memorised}`` (``memorised`` int8: greedy decoding from the prefix
reproduces the suffix; -1 = not presented) and the metrics :data:`LM_METRICS`; its ``data()`` is the
:class:`memloc.core.sequences.SequenceSet` and its ``model()`` the language model, both rebuilt from
``run.json`` and checked against ``run.h5``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch import nn

from .corpora import build_sequences
from .data import build_data
from .dropout import dropout_layers, insert_example_tied_dropout
from .errors import MemlocError
from .lm import build_lm, hf_from_config
from .models import build_model, spec_name
from .results import load_result
from .runtime import atomic_path
from .sequences import SequenceSet, not_classifier

__all__ = ["Run", "load", "as_run", "save_atomic", "load_checkpoint", "checkpoint_epochs", "is_complete",
           "check_new_run_dir", "clear_run_dir", "epochs_complete", "DYN_NAMES", "METRICS", "LM_DYN_NAMES",
           "LM_METRICS"]

DYN_NAMES = ("loss", "correct", "margin")
METRICS = ("train_accuracy", "clean_accuracy", "noisy_accuracy", "noisy_true_accuracy",
           "test_accuracy", "test_loss")
#: a language model's per-sequence dynamics (:data:`memloc.core.lm.MEASURES`) and per-epoch metrics:
#: training suffix loss / token accuracy, the memorised share of all sequences, of the targets and of
#: each kind (NaN where the kind is absent), and on the held-out sequences the suffix loss, token
#: accuracy and rule accuracy (the share whose greedy suffix is exactly right: TinyMem's corpora only)
LM_DYN_NAMES = ("suffix_loss", "suffix_accuracy", "memorised")
LM_METRICS = ("train_loss", "train_accuracy", "memorised", "target_memorised", "clean_memorised",
              "noisy_memorised", "backdoor_memorised", "canary_memorised", "duplicate_memorised",
              "test_loss", "test_accuracy", "test_rule_accuracy")


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`memloc.core.runtime.atomic_path`: readers never see a partial file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def checkpoint_epochs(ckpt_dir: Path) -> list[int]:
    out = []
    for p in Path(ckpt_dir).glob("epoch_*.pt"):
        try:
            out.append(int(p.stem.split("_")[1]))
        except (IndexError, ValueError):
            continue
    return sorted(out)


def open_h5(path: Path, mode: str = "r", *, tries: int = 50):
    """``run.h5`` without HDF5 file locking. The writer never modifies the file readers open: it
    appends each epoch to a copy and renames it into place (:meth:`memloc.core.recorder.Recorder`), so
    a reader (a notebook watching the run, an analysis) always sees one consistent file; an open
    that races the rename is retried."""
    for attempt in range(tries):
        if not Path(path).is_file():
            raise MemlocError(f"cannot read {str(path)!r}: no such file")
        try:
            return h5py.File(path, mode, locking=False)
        except OSError as e:
            if attempt == tries - 1:
                raise MemlocError(f"cannot read {str(path)!r}: {e}") from None
            time.sleep(0.05)


def epochs_complete(f) -> int:
    """The last epoch whose rows are written (-1: none yet; files that predate the attribute: all rows)."""
    last = f.attrs.get("epochs_complete")
    return f["dynamics/end/loss"].shape[0] - 1 if last is None else int(last)


def complete_rows(f) -> slice:
    """The rows of the epochs the writer has finished (0..epochs_complete)."""
    return slice(0, epochs_complete(f) + 1)


def load_checkpoint(path: Path) -> dict:
    """A state_dict saved by memloc, loaded with ``weights_only=True`` (no code runs)."""
    if not path.exists():
        raise MemlocError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise MemlocError(f"checkpoint {str(path)!r} is corrupt or unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


CREATING = ".creating"   # present from the first byte a Recorder writes until epoch 0 is complete
MEMLOC_FILES = ("run.json", "run.h5", "checkpoints", "writer.lock", CREATING)


def is_complete(path) -> bool:
    """Does ``path`` hold a run whose creation finished (epoch 0 recorded, no creation marker)?"""
    path = Path(path)
    if not (path / "run.json").is_file() or (path / CREATING).exists() or not (path / "run.h5").is_file():
        return False
    try:
        with open_h5(path / "run.h5", tries=5) as f:
            return epochs_complete(f) >= 0
    except (MemlocError, KeyError):
        return False


def check_new_run_dir(path, *, clear: bool = True) -> None:
    """Make ``path`` ready for a new run. A complete run is "already exists"; files a creation that
    was killed before finishing epoch 0 left behind (proved by its marker) are removed and the
    creation redone (``clear=False``: only check); anything else is refused, never deleted."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MemlocError(f"run directory {str(path)!r} is a file")
    if not path.exists() or not [p for p in path.iterdir() if p.name != "writer.lock"]:
        return
    if is_complete(path):
        raise MemlocError(f"run directory {str(path)!r} already exists ({{resume}} continues it, {{overwrite}} "
                          "replaces it; or choose a new directory)", options={"resume": True, "overwrite": True})
    if not (path / CREATING).exists():
        raise MemlocError(f"directory {str(path)!r} is not empty and not a memloc run being created; "
                          "choose a new directory")
    if clear:
        clear_run_dir(path)


# what memloc writes in a run directory, per sub-folder (anything else is the user's: never deleted)
_OURS = {".": ("run.json", "run.h5", "writer.lock", CREATING, "run.json.tmp*", "run.h5.tmp*"),
         "checkpoints": ("epoch_*.pt", "trainer_state.pt", "*.tmp*"),
         "results": ("*.h5", ".*.lock", "*.png", "*.tmp*"), "results/flip.partial": ("part_*.h5", "settings.json*"),
         "report": ("*.png", "*.md", "*.tmp*")}


def _foreign(path: Path) -> list[str]:
    out = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if rel.parts[0] == "children":      # child runs of retraining experiments (memloc.actions.children)
            continue
        folder = str(rel.parent).replace("\\", "/")
        if p.is_dir() and str(rel).replace("\\", "/") in _OURS:
            continue
        if folder not in _OURS or not any(fnmatch.fnmatch(p.name, pat) for pat in _OURS[folder]):
            out.append(str(rel))
    return sorted(out)


def clear_run_dir(path) -> None:
    """Delete memloc's files in a run directory (``writer.lock``, held by the caller, stays); a
    directory holding anything memloc did not write is refused, nothing deleted."""
    path = Path(path)
    foreign = _foreign(path)
    if foreign:
        raise MemlocError(f"{str(path)!r} holds files memloc did not write ({', '.join(foreign[:5])}); "
                          "not deleting them")
    for p in path.iterdir():
        if p.name != "writer.lock":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def ranges(xs: list[int]) -> str:
    """``0-30`` for a contiguous list, else the items."""
    if not xs:
        return "none"
    if len(xs) > 1 and xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}-{xs[-1]}"
    return ", ".join(map(str, xs))


class Run:
    """A run directory opened for analysis (see :func:`load`)."""

    def __init__(self, path, *, model_fn: Callable[[], nn.Module] | None = None, data=None):
        if not isinstance(path, (str, os.PathLike)):
            raise MemlocError(f"path must be a run directory's path, got {type(path).__name__}", argument="path")
        self.path = Path(path)
        if not (self.path / "run.json").is_file():
            raise MemlocError(f"{str(self.path)!r} is not a memloc run directory (no run.json)")
        try:
            self.info = json.loads((self.path / "run.json").read_text())
        except json.JSONDecodeError as e:
            raise MemlocError(f"{str(self.path / 'run.json')!r} is corrupt: {e}") from None
        self.config: dict = self.info.get("config", {})
        self._model_fn, self._data = model_fn, data
        #: a language model's run (sequences for examples; no labels: label_true / label_given are None)
        self.is_lm = self.info.get("kind") == "lm"
        self.label_true = self.label_given = self.kind = None
        with open_h5(self.path / "run.h5") as f:
            try:
                ex = f["examples"]
                self.is_noisy = ex["is_noisy"][:].astype(bool)
                if self.is_lm:
                    self.kind = ex["kind"].asstr()[:].astype(str)
                else:
                    self.label_true = ex["label_true"][:]
                    self.label_given = ex["label_given"][:]
            except KeyError:
                raise MemlocError(f"run {str(self.path)!r} is still being created (or its creation was "
                                  "interrupted: rerun the command that creates it)") from None

    def __repr__(self):
        return f"Run({str(self.path)!r}, epochs={self.epochs[-1] if self.epochs else None}, N={self.num_train})"

    @property
    def num_train(self) -> int:
        return len(self.is_noisy)

    @property
    def epochs(self) -> list[int]:
        """Epochs with a checkpoint and recorded rows (0 = initialisation)."""
        with open_h5(self.path / "run.h5") as f:
            last = epochs_complete(f)
        return [e for e in checkpoint_epochs(self.path / "checkpoints") if e <= last]

    @property
    def final_epoch(self) -> int:
        if not self.epochs:
            raise MemlocError(f"run {str(self.path)!r} has no checkpoints")
        return self.epochs[-1]

    @property
    def fingerprint(self) -> str:
        """This run's identity: a hash of ``run.json`` (configuration, model, data, creation time) and the
        stored labels. Every result the commands save records it (``run_fingerprint``) and :meth:`result`
        checks it: a copy of the run folder keeps it, any other run (another seed, config, labels or
        training of the same config) has its own."""
        h = hashlib.sha1(json.dumps(self.info, sort_keys=True, default=str).encode())
        for labels in (self.label_given, self.label_true):      # None for a language-model run
            if labels is not None:
                h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def results_path(self, name: str) -> Path:
        return self.path / "results" / f"{name}.h5"

    def result(self, name: str):
        """The saved result ``RUN/results/<name>.h5`` as a :class:`memloc.core.results.Result`, refused
        when it records another run's fingerprint (results from before fingerprints are read as they are)."""
        path = self.results_path(name)
        if not path.is_file():
            from .prerequisites import missing_result
            raise missing_result(self, name)
        res = load_result(path, name)
        stored = res.dataset.attrs.get("run_fingerprint")
        if stored is not None and str(stored) != self.fingerprint:
            origin = str(res.dataset.attrs.get("run", "?"))
            if origin == str(self.path.resolve()):      # the same folder, its run.json changed since
                raise MemlocError(f"{str(path)!r} was computed from this run before its run.json changed (its training "
                                  "extended with resume, or the run replaced): recompute it (overwrite)")
            raise MemlocError(f"{str(path)!r} was computed from another run, {origin!r} "
                              f"(fingerprint {stored}), not from {str(self.path)!r} ({self.fingerprint}): "
                              "delete it, or recompute it for this run (overwrite)")
        return res

    def checkpoint(self, epoch: int | None = None) -> dict:
        """The model state_dict at ``epoch`` (default: final), loaded with ``weights_only=True``."""
        epoch = self.final_epoch if epoch is None else int(epoch)
        if epoch not in self.epochs:
            raise MemlocError(f"run {str(self.path)!r} has no checkpoint for epoch {epoch} "
                              f"(available: {ranges(self.epochs)})")
        return load_checkpoint(self.path / "checkpoints" / f"epoch_{epoch:04d}.pt")

    def build_model(self) -> nn.Module:
        """A freshly constructed (randomly initialised) model of this run's architecture."""
        spec = self.info.get("model", {})
        model = self._model_fn() if self._model_fn is not None else self._build_from_spec(spec)
        if spec.get("etd") and not dropout_layers(model):  # example-tied dropout layers (etd_after=; insert_sinks)
            insert_example_tied_dropout(model, **spec["etd"])
        return model

    def _build_from_spec(self, spec: dict) -> nn.Module:
        if self.is_lm and not spec.get("spec") and spec.get("hf_config"):   # a transformers model recorded as it was
            return hf_from_config(spec["hf_config"])
        if not spec.get("spec"):
            raise MemlocError(f"run {str(self.path)!r} was recorded from an unregistered model "
                              f"({spec.get('class')}): pass model_fn= to memloc.load, or record it with "
                              "model_spec= (a memloc.register_model name or pkg.module:factory)")
        options = dict(spec.get("options", {}))
        if self.is_lm:
            return build_lm(spec["spec"], **options)
        return build_model(spec_name(spec), options.pop("in_shape", spec.get("in_shape")),
                           options.pop("num_classes", spec.get("num_classes")), **options)

    def model(self, epoch: int | None = None, device="cpu") -> nn.Module:
        """The model with the checkpoint of ``epoch`` (default final) loaded, in eval mode."""
        m = self.build_model()
        state = self.checkpoint(epoch)
        try:
            m.load_state_dict(state)
        except RuntimeError as e:
            raise MemlocError(f"the checkpoint of run {str(self.path)!r} does not fit its model "
                              f"({str(e).splitlines()[0]})") from None
        return m.to(device).eval()

    def data(self, device="cpu", *, stream: str | None = None):
        """The run's :class:`memloc.core.data.Data`, rebuilt from its data spec and checked against run.h5,
        on ``device`` or streamed (``stream``: auto | on | off; None: the process-wide setting,
        :mod:`memloc.core.stream`). Built once on the host (image folders too large for it stay on disk)."""
        if self.is_lm:
            return self._sequences().to(device)
        if self._data is None:
            spec = self.info.get("data") or (self.config if "dataset" in self.config else None)
            if spec is None:
                raise MemlocError(f"run {str(self.path)!r} was recorded without a data spec: pass data= to "
                                  "memloc.load, or record it with data_spec=")
            # a run trained on a labels file is rebuilt with the labels it stored (the file may have moved)
            self._data = build_data(spec, label_given=self.label_given if spec.get("labels") else None,
                                    stream=stream)
            if not (np.array_equal(self._data.label_given, self.label_given)
                    and np.array_equal(self._data.label_true, self.label_true)):
                raise MemlocError(f"the dataset rebuilt for {str(self.path)!r} from {spec} does not match its stored labels: "
                                  "pass data= to memloc.load, or record with a data_spec that rebuilds these examples")
        return self._data.to(device, stream=stream)

    def _sequences(self):
        """The run's SequenceSet, rebuilt from its corpus spec and checked against the tokens in run.h5."""
        if self._data is None:
            spec, info = self.info.get("data"), self.info
            if spec is None and "vocab" not in info:
                raise MemlocError(f"run {str(self.path)!r} was recorded without a corpus spec: pass data= (its "
                                  "SequenceSet) to memloc.load")
            with open_h5(self.path / "run.h5") as f:
                ex, tokens, test = f["examples"], f["examples/tokens"][:], f["test/tokens"][:]
                data = build_sequences(spec) if spec is not None else SequenceSet(   # the sequences recorded
                    info.get("sequence_set", "recorded"), tokens, test, ex["source_index"][:], self.is_noisy, self.kind,
                    info["prefix_len"], info["suffix_len"], info["vocab"], ex["copy_of"][:], info.get("sequence_info", {}))
                same = np.array_equal(data.tokens.numpy(), tokens) and np.array_equal(data.test_tokens.numpy(), test)
            if not same or not np.array_equal(data.is_memorised_target, self.is_noisy):
                raise MemlocError(f"the sequences rebuilt for {str(self.path)!r} do not match its stored tokens")
            self._data = data
        return self._data

    def dynamics(self, name: str, when: str = "end") -> np.ndarray:
        """``/dynamics/<when>/<name>`` as an (epoch, N) array (when: presentation | end)."""
        with open_h5(self.path / "run.h5") as f:
            key = f"dynamics/{when}/{name}"
            if key not in f:
                if self.is_lm and name in DYN_NAMES:        # an image analysis given a language model's run
                    raise not_classifier(f"{str(self.path)!r} is a language model's run (it records "
                                         f"{', '.join(LM_DYN_NAMES)}, not {name})")
                names = LM_DYN_NAMES if self.is_lm else DYN_NAMES
                valid = ", ".join(f"dynamics/{w}/{n}" for w in ("presentation", "end") for n in names)
                raise MemlocError(f"run.h5 has no {key!r}; valid: {valid}")
            return f[key][complete_rows(f)]

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-epoch metrics (train / clean / noisy / test accuracy, test loss; a language model's:
        :data:`LM_METRICS`)."""
        with open_h5(self.path / "run.h5") as f:
            return {k: f[f"metrics/{k}"][complete_rows(f)] for k in f["metrics"]}


def load(path, *, model_fn: Callable[[], nn.Module] | None = None, data=None) -> Run:
    """Open a run directory. ``model_fn`` / ``data`` are needed only for runs whose model / data
    cannot be rebuilt from ``run.json`` (an unregistered model, data recorded without a spec)."""
    return Run(path, model_fn=model_fn, data=data)


def as_run(source, *, need_checkpoints: bool = True) -> Run:
    """``source`` as a :class:`Run` (a Run or a path), insisting on at least one checkpoint."""
    if not isinstance(source, (Run, str, os.PathLike)):
        raise MemlocError(f"source must be a memloc.Run or a run directory's path, got {type(source).__name__}",
                          argument="source")
    run = source if isinstance(source, Run) else load(source)
    if need_checkpoints and not run.epochs:
        raise MemlocError(f"run {str(run.path)!r} has no checkpoints (expected "
                          f"{str(run.path / 'checkpoints' / 'epoch_0000.pt')!r} ...); train it first")
    return run
