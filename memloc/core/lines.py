"""Progress as plain lines, for output that is not a terminal (a log file, a CI job, ``nohup``).

tqdm hides its bars when stderr is not a terminal, so a long step written to a file showed nothing
until it ended. :class:`Lines` stands in for the bar there: a line ``desc: i/N unit (elapsed s)`` on
stderr at most every :data:`INTERVAL` seconds (``MEMLOC_PROGRESS_SECONDS`` sets it; 0 prints every
step), and a closing line ``desc: done N unit in S s`` when it printed any. Work shorter than the
interval stays silent, as the terminal bar (``leave=False``) leaves nothing behind.
"""
from __future__ import annotations

import os
import sys
import time

__all__ = ["Lines", "interval"]

INTERVAL = 30.0


def interval() -> float:
    """Seconds between two lines: ``MEMLOC_PROGRESS_SECONDS`` or :data:`INTERVAL` (an unreadable value: the default)."""
    try:
        return max(0.0, float(os.environ.get("MEMLOC_PROGRESS_SECONDS", INTERVAL)))
    except ValueError:
        return INTERVAL


class Lines:
    """The part of tqdm's interface memloc uses (iterate, ``update``, ``set_postfix``, ``close``, ``with``)."""

    def __init__(self, iterable=None, *, desc: str = "", total=None, unit: str = "it", initial: int = 0, **_):
        self.iterable, self.desc, self.unit, self.n = iterable, desc or "progress", unit, int(initial)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable) + self.n
        self.total, self.postfix, self.every = total, "", interval()
        self.start = self.last = time.monotonic()
        self.printed = False

    def _line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        self.printed = True

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            self._line(f"{self.desc}: {self.n}{of} {self.unit} ({now - self.start:.0f} s){self.postfix}")

    def set_postfix(self, ordered_dict=None, refresh=True, **kw) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = "".join(f", {k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.printed:
            self.printed = False
            self._line(f"{self.desc}: done {self.n} {self.unit} in {time.monotonic() - self.start:.0f} s")

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
