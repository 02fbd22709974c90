"""When to stream a dataset (:mod:`memloc.core.stream`): the mode (auto | on | off), the loader workers
and the size limit, process-wide (environment variables ``MEMLOC_STREAM``, ``MEMLOC_WORKERS``,
``MEMLOC_STREAM_LIMIT``, inherited by child processes) or per call, and the auto rule."""
from __future__ import annotations

import contextlib
import os

import torch

from .errors import MemlocError
from .runtime import describe_range, in_range

__all__ = ["STREAM_MODES", "FRACTION", "stream_settings", "set_streaming", "streaming", "stream_mode",
           "should_stream"]


STREAM_MODES = ("auto", "on", "off")
FRACTION = 0.5       # auto: stream inputs larger than this fraction of the free device memory
_ENV = {"mode": "MEMLOC_STREAM", "workers": "MEMLOC_WORKERS", "limit": "MEMLOC_STREAM_LIMIT"}


def stream_mode(stream=None) -> str:
    """``stream`` (auto | on | off; None: the process-wide setting) checked."""
    mode = os.environ.get(_ENV["mode"], "auto") if stream is None else stream
    if mode not in STREAM_MODES:
        if stream is None:      # the environment's, not an argument: name the variable
            raise MemlocError(f"environment variable {_ENV['mode']} must be one of {', '.join(STREAM_MODES)}, "
                              f"got {mode!r}")
        raise MemlocError(f"stream must be one of {', '.join(STREAM_MODES)}, got {mode!r}", argument="stream")
    return mode


def _whole(name: str, value) -> int:
    """``value`` (a number, or its text from the environment) as an integer >= 0 (as :func:`check_range` says it;
    ``name``: the argument, or the environment variable the text came from)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass                # refused below, with the text as given
    if not in_range(number, low=0, integer=True):
        raise MemlocError(f"{name} must be {describe_range(low=0, integer=True)}, got {value!r}", argument=name)
    return int(number)


def _check_workers(workers) -> int:
    return _whole("workers", workers)


def _check_limit(limit) -> int:
    return _whole("limit", limit)


def stream_settings() -> dict:
    """The process-wide settings: ``{"mode", "workers", "limit"}`` (``limit`` None: from free memory)."""
    workers = os.environ.get(_ENV["workers"])
    limit = os.environ.get(_ENV["limit"])
    return {"mode": stream_mode(),
            "workers": min(4, os.cpu_count() or 1) if workers is None else _whole(_ENV["workers"], workers),
            "limit": None if limit is None else _whole(_ENV["limit"], limit)}


def set_streaming(mode: str | None = None, *, workers: int | None = None, limit: int | None = None) -> dict:
    """Set the process-wide streaming settings (None leaves one as it is); returns the environment
    entries they replaced (for :func:`streaming` to restore). Child processes inherit them."""
    new = {"mode": None if mode is None else stream_mode(mode),
           "workers": None if workers is None else _check_workers(workers),
           "limit": None if limit is None else _check_limit(limit)}
    old = {_ENV[k]: os.environ.get(_ENV[k]) for k, v in new.items() if v is not None}
    for k, v in new.items():
        if v is not None:
            os.environ[_ENV[k]] = str(v)
    return old


@contextlib.contextmanager
def streaming(mode: str | None = None, *, workers: int | None = None, limit: int | None = None):
    """:func:`set_streaming` for the duration of a ``with`` block."""
    old = set_streaming(mode, workers=workers, limit=limit)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def should_stream(nbytes: int, device, *, stream: str | None = None, lazy: bool = False) -> bool:
    """Stream ``nbytes`` of inputs bound for ``device``? ``lazy``: the inputs are still on disk
    (they are then read from disk when they exceed the limit of the host memory)."""
    mode = stream_mode(stream)
    if mode != "auto":
        return mode == "on"
    limit = stream_settings()["limit"]
    if limit is None:
        device = torch.device(device)
        if device.type == "cuda":
            limit = FRACTION * torch.cuda.mem_get_info(device)[0]
        elif lazy:
            ram = _available_ram()
            limit = None if ram is None else FRACTION * ram
        if limit is None:
            return False
    return nbytes > limit
