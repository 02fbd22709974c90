"""What a run directory holds, and what to run next: ``memloc.status(run)`` (command: ``memloc status RUN``).

Read only (nothing is written, no lock is taken): ``run.json`` (dataset, model, the options that
differ from the trainer's defaults), ``run.h5`` and the checkpoints (the epochs recorded, complete or
interrupted, and the command that resumes an interruption), every result file (``RUN/results/*.h5``:
when it was computed, with which options, and whether it belongs to this run as it is now: a result
whose run fingerprint differs was computed from another run or before the run was extended), the
work in progress of interrupted analyses (``RUN/results/<name>.partial``), the locks held (by which
live process, read from ``/proc/locks`` where there is one), the child runs of retraining experiments
and the report. A run that cannot be read (no ``run.json``, a corrupt ``run.h5``) is a
:class:`MemlocError`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from ..core import registry
from ..core.errors import MemlocError
from ..core.run import CREATING, Run, checkpoint_epochs, epochs_complete, is_complete, open_h5, ranges
from ..scale.parts import saved_settings

__all__ = ["status", "Status"]


@dataclass
class StoredResult:
    """One ``RUN/results/<name>.h5``: ``state`` is ``current``, ``stale`` (computed from another run, or
    from this one before it was extended) or ``unreadable``."""

    name: str
    path: Path
    created: str | None = None
    config: dict = field(default_factory=dict)
    state: str = "current"


@dataclass
class Partial:
    """The saved work of an interrupted analysis (``RUN/results/<name>.partial``)."""

    name: str
    path: Path
    parts: int
    settings: dict | None
    command: str | None


@dataclass
class Child:
    """A child run (``RUN/children/<label>-<hash>``): ``state`` is ``complete``, ``interrupted`` or ``damaged``."""

    name: str
    path: Path
    state: str
    epochs: list[int] = field(default_factory=list)
    planned: int | None = None


@dataclass
class Status:
    """What a run directory holds (:func:`status`); ``str(status)`` is the text ``memloc status`` prints."""

    path: Path
    kind: str                   # "image" (a classifier's run) or "lm" (a language model's)
    dataset: str | None
    model: str | None
    options: dict               # the stored options that differ from the trainer's defaults
    num_train: int
    targets: int                # noisy labels (image runs) / memorisation targets (language models)
    epochs: list[int]           # epochs with a checkpoint and recorded rows
    checkpoints: list[int]      # every checkpoint file present
    planned: int | None         # the epochs it was trained for (None: recorded in the user's own loop)
    training: str               # complete | interrupted | training | recorded (by the user's loop: no planned count)
    resume: str | None          # the command (or call) that continues an interrupted training
    results: list[StoredResult]
    partial: list[Partial]
    locks: dict[str, int]       # lock file (relative to the run) -> pid of the live process holding it
    children: list[Child]
    report: str | None          # None: no report; "current" or "stale" (older than a result)
    next: list[str]             # suggested commands, most useful first

    def __str__(self) -> str:
        lines = [f"{self.path}: {self._what()}"]
        opts = ", ".join(f"{k} {_short(v)}" for k, v in self.options.items())
        lines.append(f"options: {opts or ('none recorded' if self.training == 'recorded' else 'the defaults')}")
        held = self.locks.get("writer.lock")
        state = {"complete": "complete", "interrupted": f"interrupted (continue: {self.resume})",
                 "training": f"being written now (pid {held})",
                 "recorded": "recorded by your own loop (it alone knows how many epochs it plans)"}[self.training]
        of = f" of {self.planned}" if self.planned is not None else ""
        lines.append(f"training: epochs {ranges(self.epochs)}{of}, {state}; checkpoints {ranges(self.checkpoints)}")
        if self.results:
            lines.append("results:")
            width = max(len(r.name) for r in self.results)
            for r in self.results:
                when = (r.created or "?")[:16].replace("T", " ")
                note = {"current": "", "unreadable": "  UNREADABLE (delete it and recompute)",
                        "stale": "  STALE: computed from another run or before this one was extended "
                                 "(recompute with --overwrite)"}[r.state]
                opts = ", ".join(f"{k} {_short(v)}" for k, v in r.config.items() if v not in (None, False))
                lines.append(f"  {r.name:<{width}}  {when}  {opts}{note}")
        else:
            lines.append("results: none")
        for p in self.partial:
            saved = f"{p.parts} part file{'s' * (p.parts != 1)} saved"
            pid = self.busy(p.name)
            lines.append(f"in progress: {p.name}, {saved}; " + (f"being computed now (pid {pid})" if pid else
                         f"rerun {p.command or 'memloc ' + p.name} {self.path} with the same settings "
                         f"({_short(p.settings or {}, 60)}) to continue it"))
        for lock, pid in self.locks.items():
            name = _locked(lock)
            if lock != "writer.lock" and not any(p.name == name for p in self.partial):
                lines.append(f"busy: {lock} is held by pid {pid} (a {name} is being computed now)")
        if self.children:
            done = sum(c.state == "complete" for c in self.children)
            lines.append(f"child runs: {len(self.children)} ({done} complete)")
            lines += [f"  {c.name}: epochs {ranges(c.epochs)}"
                      f"{f' of {c.planned}' if c.planned is not None else ''}, {c.state}" for c in self.children]
        if self.report is not None:
            lines.append(f"report: {self.path / 'report' / 'report.md'}"
                         + (" (older than a result: rerun memloc report)" if self.report == "stale" else ""))
        if self.next:
            lines.append("next: " + "; ".join(self.next))
        return "\n".join(lines)

    def busy(self, name: str) -> int | None:
        """The pid of the live process computing result ``name`` now (holding its lock), or None."""
        return next((pid for lock, pid in self.locks.items() if _locked(lock) == name), None)

    def _what(self) -> str:
        about = ", ".join(f"{k} {v}" for k, v in (("dataset", self.dataset), ("model", self.model)) if v)
        if self.kind == "lm":
            return (f"a language model's run ({about + ', ' if about else ''}{self.num_train} training sequences, "
                    f"{self.targets} memorisation targets)")
        return f"a classifier's run ({about + ', ' if about else ''}{self.num_train} examples, {self.targets} noisy labels)"


def _locked(lock: str) -> str | None:
    """The result a lock file (relative to the run) protects: ``results/.flip.lock`` and
    ``results/.flip.partial.lock`` -> ``flip``; None for the writer's lock."""
    name = Path(lock).name
    if lock == "writer.lock" or not name.startswith("."):
        return None
    return name[1:].removesuffix(".lock").removesuffix(".partial")


def _short(value, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _lock_holders(paths: list[Path]) -> dict[Path, int]:
    """The pid of the live process holding each of ``paths`` (flock), from ``/proc/locks``; elsewhere a
    non-blocking shared lock tells whether it is held (its holder: the pid the lock file records)."""
    inodes = {}
    for p in paths:
        try:
            inodes[os.stat(p).st_ino] = p
        except OSError:
            continue
    out = {}
    try:
        table = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return _probe(list(inodes.values()))
    for line in table:
        words = line.split()
        if "->" in words or len(words) < 6 or words[1] != "FLOCK":
            continue                    # a process waiting for a lock does not hold it
        try:
            inode = int(words[5].rsplit(":", 1)[1])
        except (IndexError, ValueError):
            continue
        if inode in inodes:
            out[inodes[inode]] = int(words[4])
    return out


def _probe(paths: list[Path]) -> dict[Path, int]:
    try:
        import fcntl
    except ImportError:                 # no flock on this platform: locks protect nothing there either
        return {}
    out = {}
    for p in paths:
        with open(p) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                text = f.read().strip()
                out[p] = int(text) if text.isdigit() else -1
    return out


def _stored_result(path: Path, fingerprint: str) -> StoredResult:
    name = path.stem
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = {k: f.attrs.get(k) for k in ("memloc_schema", "created", "config", "run_fingerprint")}
    except OSError:
        return StoredResult(name, path, state="unreadable")
    text = lambda v: v.decode() if isinstance(v, bytes) else (None if v is None else str(v))
    try:
        config = json.loads(text(attrs["config"]) or "{}")
    except ValueError:
        return StoredResult(name, path, state="unreadable")
    name = (text(attrs["memloc_schema"]) or name).removeprefix("memloc.")
    stored = text(attrs["run_fingerprint"])
    state = "stale" if stored is not None and stored != fingerprint else "current"
    return StoredResult(name, path, text(attrs["created"]), config, state)


def _child(path: Path) -> Child:
    if not is_complete(path):
        return Child(path.name, path, "damaged" if not (path / CREATING).exists() else "interrupted")
    try:
        run = Run(path)
        epochs, planned = run.epochs, run.config.get("epochs")
    except MemlocError:
        return Child(path.name, path, "damaged")
    done = planned is None or (epochs and epochs[-1] >= planned)
    return Child(path.name, path, "complete" if done else "interrupted", epochs, planned)


def _defaults(kind: str) -> dict:
    if kind == "lm":
        from ..training.lm import LM_DEFAULTS
        return LM_DEFAULTS
    from ..training.train import DEFAULTS
    return DEFAULTS


def _next(st: Status, commands: dict[str, str]) -> list[str]:
    """What to run next: continue what was interrupted, then the first step of the order of work whose
    result is missing or stale, then the report."""
    run = str(st.path)
    if st.training == "interrupted":
        return [st.resume]
    if st.training == "training":
        return []
    out = [f"{p.command or 'memloc ' + p.name} {run}" for p in st.partial if not st.busy(p.name)]
    have = {r.name for r in st.results if r.state == "current"} | {n for n in map(_locked, st.locks) if n}
    if st.kind == "lm":
        order = ("localise_neurons",)
    else:       # without known wrong labels flip has nothing to search by default: find them first
        order = ("flip", "scores", "issues", "clean") if st.targets else ("issues", "clean")
    missing = next((n for n in order if n not in have), None)
    if missing is not None and not any(p.name == missing for p in st.partial):
        out.append(f"memloc {commands.get(missing, missing)} {run}")
    stale = [r.name for r in st.results if r.state == "stale"]
    if stale:
        out.append(f"memloc {commands.get(stale[0], stale[0])} {run} --overwrite")
    if st.results and st.report != "current":
        out.append(f"memloc report {run}" + (" --overwrite" if st.report == "stale" else ""))
    return out


def status(source) -> Status:
    """What the run directory ``source`` (a path or a :class:`memloc.Run`) holds and what to run next
    (see the module docstring); ``print(memloc.status(run))`` shows it."""
    path = Path(getattr(source, "path", source))
    if (path / CREATING).exists():                  # epoch 0 is not complete: there is no run yet
        pid = _lock_holders([path / "writer.lock"]).get(path / "writer.lock")
        raise MemlocError(f"run {str(path)!r} is being created by pid {pid} (epoch 0 is not recorded yet); try again "
                          "in a moment" if pid else f"the creation of run {str(path)!r} was interrupted before epoch 0 "
                          "was recorded: rerun the command that creates it")
    run = Run(path)                                 # no run.json, a corrupt one or no run.h5: a MemlocError
    try:
        with open_h5(path / "run.h5") as f:
            last = epochs_complete(f)
    except (KeyError, OSError) as e:
        raise MemlocError(f"run {str(path)!r} is damaged: its run.h5 cannot be read ({e})") from None
    kind = "lm" if run.is_lm else "image"
    cfg = run.config
    trained = "dataset" in cfg and "model" in cfg   # by memloc train (else: a Recorder in the user's loop)
    defaults = _defaults(kind) if trained else {}
    options = {k: v for k, v in cfg.items() if k not in ("dataset", "model")
               and (not trained or k == "epochs" or defaults.get(k, v) != v or k not in defaults)}
    checkpoints = checkpoint_epochs(path / "checkpoints")
    epochs = [e for e in checkpoints if e <= last]
    planned = cfg.get("epochs") if trained else None
    locks = _lock_holders([path / "writer.lock", *sorted((path / "results").glob(".*.lock"))])
    locks = {str(p.relative_to(path)): pid for p, pid in locks.items()}
    if "writer.lock" in locks:
        training = "training"
    elif planned is None:
        training = "recorded"
    elif not epochs or epochs[-1] < planned:
        training = "interrupted"
    else:
        training = "complete"
    resume = f"memloc train {path} --resume" if training == "interrupted" else None     # reads the stored options
    found = {f.name: f.command for f in registry.discover() if f.kind == "analysis" and f.command}
    rank = {name: i for i, name in enumerate(registry.analyses())}
    results = [_stored_result(p, run.fingerprint) for p in sorted((path / "results").glob("*.h5"))]
    results.sort(key=lambda r: (rank.get(r.name, len(rank)), r.name))
    partial = []
    for folder in sorted((path / "results").glob("*.partial")):
        name = folder.name.removesuffix(".partial")
        partial.append(Partial(name, folder, len(list(folder.glob("part_*"))), saved_settings(folder),
                               f"memloc {found[name]}" if name in found else None))
    children = [_child(p) for p in sorted((path / "children").glob("*")) if p.is_dir()]
    md = path / "report" / "report.md"
    report = None
    if md.is_file():
        newest = max((r.path.stat().st_mtime for r in results), default=0)
        report = "stale" if newest > md.stat().st_mtime else "current"
    st = Status(path, kind, cfg.get("dataset"), cfg.get("model"), options, run.num_train, int(run.is_noisy.sum()),
                epochs, checkpoints, planned, training, resume, results, partial, locks, children, report, [])
    st.next = _next(st, found)
    return st
