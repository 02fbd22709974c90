"""Small helpers every analysis shares: devices, progress bars, comma-separated lists."""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .errors import MemlocError
from .numeric import as_number, check_range, describe_range, in_range  # noqa: F401 (the helpers' old home)

__all__ = ["world", "alone", "resolve_device", "progress", "split_list", "check_range", "check_flag", "in_range", "as_number", "describe_range", "check_choices", "import_object",
           "atomic_path", "FileLock", "make_dir", "check_creatable"]


def world() -> tuple[int, int]:
    """(rank, number of processes) of the joined process group; (0, 1) outside one (or :func:`alone`)."""
    if dist.is_available() and dist.is_initialized() and not _ALONE:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_ALONE = False


@contextlib.contextmanager
def alone():
    """Within it this process works as if outside the process group (:func:`world` is (0, 1); no
    parts are shared): each rank computes the same small input itself (e.g. the scores a grid of
    training runs is built from) instead of splitting it."""
    global _ALONE
    before, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = before


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a :class:`MemlocError`."""
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise MemlocError(f"unknown device {name!r}; valid: auto, cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MemlocError("device 'cuda' was asked for but no CUDA device is available (use 'cpu' or 'auto')")
    return torch.device(name)


def progress(iterable=None, **kw):
    """tqdm with memloc defaults: a bar on stderr when it is a terminal; otherwise (a log file) a line
    with the elapsed time every 30 s (:class:`memloc.core.lines.Lines`)."""
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("disable", None)
    if world()[0] > 0:          # split across processes: rank 0 shows the bars
        kw["disable"] = True
    if kw["disable"] is None and not _terminal():
        from .lines import Lines
        return Lines(iterable, **kw)
    return tqdm(iterable, **kw)


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):     # replaced or closed stderr
        return False


def split_list(value) -> list[str] | None:
    """``"a,b"`` / ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (None stays None; empty items dropped; a
    single non-string value is one item, so its caller names it as unknown)."""
    if value is None:
        return None
    if isinstance(value, str):          # numpy's str_ too (it also has __array__)
        items = [value]
    elif isinstance(value, (list, tuple, set, frozenset, range)) or getattr(value, "ndim", 0) > 0:
        items = list(value)             # a list, or an array / tensor of names or numbers
    else:
        items = [value]
    items = [item.item() if hasattr(item, "item") and getattr(item, "ndim", 1) == 0 else item for item in items]
    return [s.strip() for item in items for s in str(item).split(",") if s.strip()]


def check_flag(name: str, value) -> bool:
    """``value`` as a bool; :class:`MemlocError` naming ``name`` unless it is True or False (numpy's too):
    ``"no"`` or ``2`` would silently read as True."""
    if not (isinstance(value, bool) or type(value).__name__ in ("bool_", "bool")):
        raise MemlocError(f"{name} must be True or False, got {value!r}", argument=name)
    return bool(value)


def check_choices(name: str, values, valid, what: str) -> list[str]:
    """``values`` (a list or comma-separated string) as a list without repeats, each one of ``valid``;
    :class:`MemlocError` naming ``name`` when one is not, or none is given."""
    chosen = split_list(values) or []
    bad = [v for v in chosen if v not in valid]
    if bad or not chosen:
        raise MemlocError(f"{name} names no {what} ({', '.join(map(repr, bad)) or 'none given'}); valid: "
                          f"{', '.join(valid)}", argument=name)
    return list(dict.fromkeys(chosen))


def import_object(path: str, what: str = "object"):
    """The object named by an import path ``pkg.module:attr`` (``attr`` may be dotted)."""
    import importlib
    module, sep, attr = str(path).partition(":")
    if not sep or not module or not attr:
        raise MemlocError(f"{what} {path!r} is not an import path of the form pkg.module:name")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise MemlocError(f"cannot import {module!r} for {what} {path!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MemlocError(f"module {module!r} has no {attr!r} (for {what} {path!r})")
        obj = getattr(obj, part)
    return obj


class atomic_path:
    """``with atomic_path(p) as tmp:`` write ``tmp``; it replaces ``p`` only if the block succeeds."""

    def __init__(self, path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(self.path.name + ".tmp*"):   # left by killed writers
            pid = stale.name[len(self.path.name) + 4:]
            try:   # an hour old and its process gone (another host's live writer is never that old)
                old = time.time() - stale.stat().st_mtime > 3600
            except OSError:
                continue
            if pid.isdigit() and old and not _alive(int(pid)):
                stale.unlink(missing_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_creatable(path) -> None:
    """:class:`MemlocError` unless ``path`` exists as a folder or could be created (checked without
    creating anything, so a later mistake leaves no empty folder behind)."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise MemlocError(f"cannot create the folder {str(path)!r}: {str(p)!r} is a file")
            if p != path and not os.access(p, os.W_OK | os.X_OK):
                raise MemlocError(f"cannot create the folder {str(path)!r}: {str(p)!r} is not writable")
            return


def make_dir(path, what: str = "folder") -> Path:
    """``mkdir -p`` with one clear error (a parent that is a file, no permission) naming ``what``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MemlocError(f"cannot create the {what} {str(path)!r}: {e.strerror}") from None
    return path


def partial_folder(path) -> Path:
    """Where the resumable work of the result file ``path`` lives: ``<stem>.partial`` beside it."""
    return Path(path).with_name(Path(path).stem + ".partial")


class FileLock:
    """An exclusive, non-blocking lock on ``path`` (``flock``), held until :meth:`release`.

    ``FileLock(path, busy="message")`` raises :class:`MemlocError` with ``busy`` (plus the holder's
    pid) when another process holds it; with ``wait=True`` it says so on stderr ("busy ...: waiting")
    and waits until the holder releases it. Released automatically when the process ends. With
    ``take_over_own``, a lock an earlier object of this process still holds (a notebook re-running
    a cell) is taken over with a warning instead.
    """

    _held: dict = {}

    def __init__(self, path, busy: str, *, take_over_own: bool = False, wait: bool = False):
        self.path = Path(path)
        key = str(self.path.resolve())
        if take_over_own and key in FileLock._held:
            warnings.warn(f"taking over {str(self.path)!r} from an earlier object of this process")
            FileLock._held[key].release()
        make_dir(self.path.parent)
        self.file = open(self.path, "a+")
        self.key = key
        try:
            import fcntl
        except ImportError:   # no flock on this platform: no protection, no error
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip()
            busy = f"{busy}{f' (pid {holder})' if holder else ''}"
            if not wait:
                self.file.close()
                raise MemlocError(busy) from None
            print(f"{busy}: waiting for it", file=sys.stderr, flush=True)
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX)
            except BaseException:       # Ctrl-C while waiting
                self.file.close()
                raise
        except OSError as e:   # a filesystem without locks (some network mounts): go on unprotected
            warnings.warn(f"cannot lock {str(self.path)!r} ({e.strerror}); concurrent writers are not detected")
        FileLock._held[key] = self
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if FileLock._held.get(self.key) is self:
            del FileLock._held[self.key]
        if not self.file.closed:
            self.file.close()

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
