"""Child runs: fresh trainings with a parent run's recipe and a few changed settings.

Pruning, cleaning and JTT retrain with the parent's own training config (same model, schedule,
epochs, data, noise), changing only the training set (``subset``), the given labels (``labels``),
the loss weights (``upweight``) or the ``seed``. Each child lives in
``PARENT/children/<label>-<hash of its config>/``: a finished child is reused by every later
experiment that needs the same config, an interrupted one resumes (bit-identical), and a child
whose config equals the parent's is the parent itself. ``jobs > 1`` trains children in parallel
processes (each with ``cores // jobs`` torch threads, also a child trained alone in this process, so
a rerun that finds one child left trains it as the first run did; results differ from a ``jobs=1``
run in the last float bits, as any change of thread count does).

Under torchrun (:mod:`memloc.scale.distributed`) the children are split across the processes: rank 0's
list is the one trained, rank r trains every K-th child of it (each a one-process training run in
its own folder; ``jobs`` parallel ones per rank), and every rank waits until all are finished.
What an experiment computes before and after its children (its scores, the evaluations) each rank
computes alone (:func:`memloc.scale.distributed.alone`), and rank 0 returns the result.

A child that keeps its parent's labels file trains on the labels the parent *stored* for its examples
(:func:`parent_labels`), never on the file as it is now: a run is defined by what it stored, and the
file may have changed (or gone) since the parent was trained.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..scale.distributed import alone, broadcast, shard, world
from ..core.errors import MemlocError
from ..core.pool import process_pool
from ..core.run import Run, check_new_run_dir, is_complete, load
from ..core.runtime import FileLock, check_range, progress, resolve_device

__all__ = ["parent_config", "parent_labels", "subset_config", "check_seeds", "child_path", "train_runs",
           "train_children", "save_array"]


def parent_config(run: Run) -> dict:
    """The training config of ``run`` (keys of :data:`memloc.training.train.DEFAULTS`); runs recorded by a
    user's own loop cannot be retrained here."""
    from ..core.sequences import not_classifier
    from ..training.train import DEFAULTS
    if run.is_lm:          # before the recipe: a language model's run recorded by its own loop has none either
        raise not_classifier(f"{str(run.path)!r} is a language model's run")
    cfg = run.config
    if "dataset" not in cfg or "model" not in cfg or "epochs" not in cfg:
        raise MemlocError(f"run {str(run.path)!r} was not trained by memloc train (a Recorder in your own loop): "
                          "retraining experiments need memloc's trainer and its recipe", argument="run")
    return {k: cfg.get(k, v) for k, v in DEFAULTS.items()}


def subset_config(base: dict, ids, num_train: int) -> dict:
    """``base`` trained on the examples ``ids`` of the parent's training set of ``num_train``
    examples (ids of a parent that is itself a subset run are mapped back to ids of the full set;
    keeping every example keeps the parent's set). Loss weights are dropped: their ids number the
    parent's examples, not the child's."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    cfg = {**base, "upweight": 1.0, "upweight_ids": None}
    if len(ids) == num_train:
        return cfg
    full = base.get("subset")
    cfg["subset"] = (np.sort(np.asarray(full, dtype=np.int64))[ids] if full is not None else ids).tolist()
    return cfg


def parent_labels(parent: Run, cfg: dict) -> np.ndarray | None:
    """The given labels a child with config ``cfg`` trains on when it keeps ``parent``'s labels file: the
    parent's stored labels of the child's examples (in the child's order). None when the child's labels
    are not the parent's file (synthetic noise, rebuilt from its seed; relabelled labels of its own)."""
    base = parent_config(parent)
    if not base.get("labels") or cfg.get("labels") != base["labels"]:
        return None
    rows, ids = (None if c.get("subset") is None else np.sort(np.asarray(c["subset"], dtype=np.int64))
                 for c in (base, cfg))                          # ids of the full training set; None: all of it
    if rows is None and ids is None:
        return parent.label_given
    rows = np.arange(parent.num_train) if rows is None else rows
    pos = None if ids is None else np.searchsorted(rows, ids)
    if pos is None or pos.max(initial=0) >= len(rows) or not np.array_equal(rows[pos], ids):
        raise MemlocError(f"a child run of {str(parent.path)!r} trains on examples the parent did not train on; "
                          "their labels are not stored in it", argument="run")
    return parent.label_given[pos]


def check_seeds(seeds) -> list[int]:
    """Training seeds as a checked, non-empty list of distinct whole numbers (each seed is one run:
    a seed given twice would count the same run twice and fake a zero standard error)."""
    values = [seeds] if np.isscalar(seeds) else list(seeds)
    out = []
    for s in values:
        try:
            whole = not isinstance(s, bool) and float(s).is_integer()
        except (TypeError, ValueError):
            whole = False
        if not whole:
            raise MemlocError(f"seeds must be whole numbers, got {s!r}", argument="seeds")
        out.append(int(float(s)) if isinstance(s, str) else int(s))
    if not out:
        raise MemlocError("give at least one seed", argument="seeds")
    out = [check_range("seeds", s, low=0, high=2**32 - 1, integer=True) for s in out]
    twice = sorted({s for s in out if out.count(s) > 1})
    if twice:
        raise MemlocError(f"seeds must be distinct; {', '.join(map(str, twice))} given more than once", argument="seeds")
    return out


def _digest(cfg: dict) -> str:
    """A config's identity; options added later count only when they differ from their default."""
    from ..training.train import DEFAULTS, LATER_OPTIONS
    cfg = {k: v for k, v in cfg.items() if not (k in LATER_OPTIONS and v == DEFAULTS[k])}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]


def child_path(parent: Run, label: str, cfg: dict) -> Path:
    """Where the child with ``cfg`` lives: the parent itself when the configs are equal; an existing
    child with the same config under another label is reused."""
    if _digest(cfg) == _digest(parent_config(parent)):
        return parent.path
    digest = _digest(cfg)
    found = sorted((parent.path / "children").glob(f"*-{digest}"))
    return found[0] if found else parent.path / "children" / f"{label}-{digest}"


def save_array(parent: Run, stem: str, values) -> str:
    """Store an array the children read (e.g. relabelled given labels) under ``PARENT/children``; returns its path."""
    values = np.asarray(values)
    folder = parent.path.resolve() / "children"      # absolute: the children's configs name it
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{hashlib.sha1(values.tobytes()).hexdigest()[:10]}.npy"
    if not path.exists():
        from ..core.runtime import atomic_path
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, values)
    return str(path)


def _finished(path: Path, epochs: int) -> bool:
    return is_complete(path) and load(path).final_epoch >= epochs


def _train_one(path: str, cfg: dict, device: str, threads: int, label_given=None) -> str:
    from ..training.train import train
    torch.set_num_threads(threads)
    # two experiments that share this child (prune's and clean's all-s1) run at once: the second waits
    # for the first to train it, then reuses it (the run's own writer lock would refuse it mid-way)
    lock = FileLock(Path(path).with_name(f".{Path(path).name}.lock"), f"child run {str(path)!r} is being "
                    "trained by another memloc process", wait=True)
    try:
        if not is_complete(path):
            try:
                check_new_run_dir(path, clear=False)
            except MemlocError:     # its folder is memloc's to name: the user can only delete it
                raise MemlocError(f"child run {str(path)!r} is damaged (not a memloc run, nor one being created): "
                                  "delete it and run the command again", argument="run") from None
        if not _finished(Path(path), cfg["epochs"]):
            train(path, cfg, device=device, resume=True, argv=["memloc", "train", path], label_given=label_given)
    finally:
        lock.release()
    return path


def train_runs(jobs_list: list[tuple], *, jobs: int = 1, device="cpu", desc: str = "runs") -> None:
    """Train (or resume) every ``(path, cfg)`` (or ``(path, cfg, label_given)``: the given labels to train on
    instead of reading ``cfg["labels"]``) not finished yet, ``jobs`` at a time, with a progress bar.

    In a process group each rank trains its share (every K-th run of rank 0's list) and returns when
    every run is finished."""
    jobs = check_range("jobs", jobs, low=1, integer=True)
    runs, labels = {}, {}
    for p, cfg, *given in broadcast([(str(p), *rest) for p, *rest in jobs_list]):     # rank 0's list on every rank
        runs.setdefault(p, cfg)
        labels.setdefault(p, given[0] if given else None)
    device = resolve_device(device)     # 'auto' too
    if world()[1] > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())      # this rank's GPU, also in spawned workers
    todo = {p: cfg for p, cfg in shard(list(runs.items())) if not _finished(Path(p), cfg["epochs"])}
    with alone():           # each run is a one-process training
        _train(todo, labels, jobs=jobs, device=device, desc=desc)
    _wait_for(runs)


def _wait_for(runs: dict, poll: float = 1.0) -> None:
    """In a process group: wait until every run (trained by the other ranks) is finished. Files, not a
    collective: the ranks' shares may take hours apart; a rank that fails stops them all (torchrun)."""
    if world()[1] == 1:
        return
    left = list(runs)
    while left:
        left = [p for p in left if not _finished(Path(p), runs[p]["epochs"])]
        if left:
            time.sleep(poll)


def _train(todo: dict, labels: dict, *, jobs: int, device, desc: str) -> None:
    if jobs > 1 and len(todo) > 1:
        from ..core.data import _REGISTERED
        local = sorted({c["dataset"] for c in todo.values() if c["dataset"] in _REGISTERED})
        if local:
            raise MemlocError(f"dataset {local[0]!r} is registered in this process only; parallel runs (jobs > 1) "
                              "need it as an import path pkg.module:factory, or use jobs=1", argument="jobs")
    bar = progress(total=len(todo), desc=f"train {desc}", unit="run")
    # a child's threads depend on `jobs` alone, not on how many children are left: a rerun that finds one
    # child left trains it as the first run would have (a thread count changes the last float bits)
    threads, before = max(1, torch.get_num_threads() // jobs), torch.get_num_threads()
    try:
        if jobs == 1 or len(todo) <= 1:
            for p, cfg in todo.items():
                _train_one(p, cfg, str(device), threads, labels[p])
                bar.update()
        else:
            pool = process_pool(jobs)       # its workers end with this process (a kill -9 leaves none)
            try:
                futures = [pool.submit(_train_one, p, cfg, str(device), threads, labels[p]) for p, cfg in todo.items()]
                for fut in cf.as_completed(futures):
                    fut.result()
                    bar.update()
            finally:            # on an error or Ctrl-C, runs not started yet are not started
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        torch.set_num_threads(before)
        bar.close()


def _check_child(child: Run, cfg: dict, labels) -> None:
    """A child found in its folder (finished or not) must be the run ``cfg`` trains there, on ``labels``
    (:func:`parent_labels`): not a run copied there, nor one trained on a labels file changed since."""
    from ..training.train import DEFAULTS, resolve_config
    want, have = resolve_config(cfg), {k: child.config.get(k, v) for k, v in DEFAULTS.items()}
    differ = [k for k in DEFAULTS if json.dumps(want[k], default=str) != json.dumps(have[k], default=str)]
    if differ:
        raise MemlocError(f"child run {str(child.path)!r} is not the run trained there (settings that differ: "
                          f"{', '.join(differ)}): delete it and run the command again", argument="run")
    if labels is not None and not np.array_equal(child.label_given, labels):
        raise MemlocError(f"child run {str(child.path)!r} was trained on other labels than its parent stored for its "
                          "examples (its labels file changed since?): delete it and run the command again",
                          argument="run")


def train_children(parent: Run, children: list[tuple[str, dict]], *, jobs: int = 1, device="cpu",
                   desc: str = "runs") -> list[Run]:
    """Train (or reuse / resume) every ``(label, cfg)`` child of ``parent``; returns their runs in order
    (in a process group: rank 0's children on every rank, once all are trained)."""
    paths, children = broadcast(([child_path(parent, label, cfg) for label, cfg in children], children))
    todo = [(p, cfg, parent_labels(parent, cfg)) for p, (_, cfg) in zip(paths, children) if p != parent.path]
    for p, cfg, y in todo:
        if is_complete(p):
            _check_child(load(p), cfg, y)
    train_runs(todo, jobs=jobs, device=device, desc=desc)
    return [load(p) for p in paths]
