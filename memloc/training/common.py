"""What memloc's trainers share (classifiers: :mod:`memloc.training.train`; language models:
:mod:`memloc.training.lm`): option checks, the run directory before any work, and the optimiser /
schedule state saved beside the checkpoints so that ``resume`` continues bit-identically."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import MemlocError
from ..core.optim import epoch_seed
from ..core.run import check_new_run_dir, is_complete, load_checkpoint, save_atomic
from ..core.runtime import check_creatable, check_range

__all__ = ["check_ranges", "check_run_dir", "trainer_state", "load_trainer_state", "save_trainer_state",
           "seed_epoch", "continue_at", "STATE_FILE"]

#: the optimiser / schedule (/ loss scaler) state of the last saved epoch, in RUN/checkpoints
STATE_FILE = "trainer_state.pt"


def check_ranges(cfg: dict, ranges: dict) -> None:
    """Every numeric option of ``cfg`` that is set within its range (key -> (int | float, low, high,
    low open, high open); None = no bound), else a :class:`MemlocError` naming it."""
    for key, (kind, low, high, low_open, high_open) in ranges.items():
        if cfg.get(key) is not None:
            check_range(key, cfg[key], low=low, high=high, integer=kind is int, low_open=low_open, high_open=high_open)


def check_run_dir(run_dir: Path, cfg: dict, defaults: dict, resume: bool, overwrite: bool) -> bool:
    """Check ``run_dir`` before any work (rank 0 alone under torchrun); returns whether to resume.
    A resumed run's stored config must equal ``cfg`` (keys it lacks count as their ``defaults``)."""
    check_creatable(run_dir)
    if resume and is_complete(run_dir):
        stored = json.loads((run_dir / "run.json").read_text()).get("config", {})
        diff = {k for k in cfg if stored.get(k, defaults.get(k)) != cfg[k]}
        if diff:
            raise MemlocError("resume with settings that differ from the stored run: "
                            + ", ".join(f"{k} (stored {stored.get(k)!r}, given {cfg[k]!r})" for k in sorted(diff)))
        return True
    if not overwrite:   # fail before any work; the Recorder clears (or overwrites) under its lock
        check_new_run_dir(run_dir, clear=False)
    return False


def trainer_state(rec, state_path: Path) -> dict | None:
    """The optimiser / schedule state saved with the run's last epoch (None for a new run); rewinds
    the run (a :class:`memloc.core.recorder.RunWriter`) to the state's epoch when that is earlier
    (a kill between checkpoint and state)."""
    if rec.epoch == 0:
        return None
    state = load_checkpoint(state_path) if state_path.exists() else None
    if state is None or state["epoch"] > rec.epoch:
        raise MemlocError(f"cannot resume {str(rec.dir)!r}: optimiser state for epoch {rec.epoch} is missing")
    if state["epoch"] < rec.epoch:
        rec.rewind_to(state["epoch"])
    return state


def save_trainer_state(state_path: Path, epoch: int, opt, sched, scaler) -> None:
    """Save the optimiser, schedule and (enabled) loss scaler state of ``epoch`` atomically."""
    save_atomic({"epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})}, state_path)


def load_trainer_state(state: dict | None, opt, sched, scaler) -> None:
    """Load a state saved by :func:`save_trainer_state` (nothing for None: a new run)."""
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])


def seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed the global generator for epoch ``epoch`` (dropout noise) and return the CPU generator of its
    batch order: both from ``(seed, epoch)``, so a resumed run replays the epoch exactly."""
    s = epoch_seed(seed, epoch)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def continue_at(rec, epoch, trainer: str) -> None:
    """Continue the run of writer ``rec`` (opened with ``resume``) where ``trainer`` (a library's trainer
    that a callback records) resumes from its own checkpoint: after ``epoch`` epochs. The run is rewound
    to that epoch (its checkpoint holds the same weights); a fractional epoch or one the run does not hold
    is a :class:`MemlocError` (``rec`` closed)."""
    done = int(round(epoch or 0))
    if abs((epoch or 0) - done) > 1e-6 or done > rec.epoch:
        rec.close()
        raise MemlocError(f"the {trainer} resumes at epoch {epoch:g}, but the run {str(rec.dir)!r} holds epochs "
                          f"0-{rec.epoch}: resume from a checkpoint saved at the end of an epoch that the run holds")
    if done < rec.epoch:
        rec.rewind_to(done)
