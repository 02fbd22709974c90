"""Small helpers every analysis shares: devices, progress bars, comma-separated lists."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import MemlocError

__all__ = ["resolve_device", "progress", "split_list", "check_range", "import_object", "atomic_path"]


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
    """tqdm with memloc defaults: to stderr, hidden when stderr is not a terminal."""
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    kw.setdefault("disable", None)
    return tqdm(iterable, **kw)


def split_list(value) -> list[str] | None:
    """``"a,b"`` / ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (None stays None; empty items dropped)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    return [s.strip() for item in items for s in str(item).split(",") if s.strip()]


def check_range(name: str, value, *, low=None, high=None, integer: bool = False) -> None:
    """:class:`MemlocError` unless ``low <= value <= high`` (bounds optional) and finite."""
    import math
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        rng = (f">= {low}" if high is None else f"<= {high}" if low is None
               else f"in [{low}, {high}]")
        raise MemlocError(f"{name} must be {'an integer ' if integer else ''}{rng}, got {value!r}", argument=name)


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
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()
        return False
