"""Worker processes that end with the process that started them.

A :class:`concurrent.futures.ProcessPoolExecutor`'s workers hold their own ends of the pool's queues:
after a ``kill -9`` of the main process they (and multiprocessing's resource tracker, kept alive by
them) waited idle for minutes, or went on training a child run no one would read. Each worker of
:func:`process_pool` watches its parent and exits within ``poll`` seconds of its death (work it
leaves is resumed by a rerun, as after any kill). Standard library only: a worker starts without
importing torch.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import threading
import time

__all__ = ["process_pool"]


def process_pool(jobs: int, *, poll: float = 0.5) -> cf.ProcessPoolExecutor:
    """A pool of ``jobs`` spawned worker processes, each exiting once this process is gone."""
    return cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_exit_with_parent, initargs=(os.getpid(), poll))


def _exit_with_parent(parent: int, poll: float) -> None:
    """In a worker: a daemon thread that ends the process when its parent ``parent`` is gone (it is
    then re-parented, so ``os.getppid()`` changes; a thread, not ``PR_SET_PDEATHSIG``, which fires
    when the parent's *thread* that started the worker ends)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="memloc-parent-watch", daemon=True).start()
