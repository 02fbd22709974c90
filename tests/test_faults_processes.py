"""Processes that share a run or outlive their parent (issue 25): two experiments that need the same
child run at once, and a pool's workers after a kill -9 of the process that started them."""
import os
import shutil
import subprocess
import sys
import threading
import time

import torch

from memloc.actions import children
from memloc.core.runtime import FileLock

CHILD = {"dataset": "digits", "model": "mlp", "epochs": 1, "batch_size": 64, "lr": 0.1}


def test_a_child_trained_by_another_experiment_is_waited_for_then_reused(tiny_run, tmp_path, capfd):
    """prune and clean run at once share `children/all-s1-*`: the second used to fail mid-way on the run's
    writer lock; it now waits for the first to finish that child (saying so) and reuses it."""
    child = tmp_path / "children" / "all-s1-0123456789"
    other = FileLock(child.with_name(f".{child.name}.lock"), "held by the other experiment")  # flock: per open file
    outcome, before = [], torch.get_num_threads()

    def second():
        try:
            outcome.append(children._train_one(str(child), CHILD, "cpu", 1))
        except BaseException as e:      # noqa: BLE001 (reported by the assertion below)
            outcome.append(e)

    waiter = threading.Thread(target=second)
    waiter.start()
    try:
        time.sleep(0.3)
        assert waiter.is_alive() and not child.exists()     # waits before touching the child's folder
        shutil.copytree(tiny_run.path, child, ignore=shutil.ignore_patterns("results"))   # the first one trains it
        trained = (child / "run.h5").stat().st_mtime_ns
    finally:
        other.release()
        waiter.join(60)
        torch.set_num_threads(before)
    assert outcome == [str(child)]
    assert (child / "run.h5").stat().st_mtime_ns == trained         # reused, not trained again
    err = capfd.readouterr().err
    assert f"child run {str(child)!r} is being trained by another memloc process (pid {os.getpid()}): waiting for it" in err


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"     # a zombie has ended
    except FileNotFoundError:
        return False


def test_pool_workers_end_with_a_killed_parent():
    """After a kill -9 of the main process its pool workers (and multiprocessing's resource tracker, held by
    them) waited idle for minutes; each worker now watches its parent and exits within a second."""
    if not os.path.isdir("/proc/self"):
        import pytest
        pytest.skip("needs /proc")
    code = ("import time\nfrom multiprocessing import resource_tracker\nfrom memloc.core.pool import process_pool\n"
            "pool = process_pool(2)\n[f.result() for f in [pool.submit(time.sleep, 0.2) for _ in range(2)]]\n"
            "print(*pool._processes, resource_tracker._resource_tracker._pid, flush=True)\ntime.sleep(120)\n")
    main = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in main.stdout.readline().split()]
    assert len(pids) == 3 and all(map(_alive, pids))
    main.kill()
    main.wait()
    t0 = time.time()
    while any(map(_alive, pids)) and time.time() - t0 < 10:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, 9)
    assert not left and time.time() - t0 < 3
