"""What memloc's trainers share (classifiers: :mod:`memloc.training.train`; language models:
:mod:`memloc.training.lm`): option checks, the run directory before any work, and the optimiser /
schedule state saved beside the checkpoints so that ``resume`` continues bit-identically."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..core.errors import MemlocError
from ..core.optim import epoch_seed
from ..core.run import check_new_run_dir, is_complete, load_checkpoint, save_atomic
from ..core.runtime import check_creatable, check_range

__all__ = ["check_ranges", "check_run_dir", "resumed_config", "check_extension", "extend_config", "trainer_state",
           "load_trainer_state", "save_trainer_state",
           "seed_epoch", "continue_at", "STATE_FILE"]

#: the optimiser / schedule (/ loss scaler) state of the last saved epoch, in RUN/checkpoints
STATE_FILE = "trainer_state.pt"


def check_ranges(cfg: dict, ranges: dict) -> None:
    """Every numeric option of ``cfg`` that is set within its range (key -> (int | float, low, high,
    low open, high open); None = no bound), else a :class:`MemlocError` naming it; each made a Python
    number in place (numpy's integers are integers, so ``run.json`` stores the number)."""
    for key, (kind, low, high, low_open, high_open) in ranges.items():
        if cfg.get(key) is not None:
            cfg[key] = check_range(key, cfg[key], low=low, high=high, integer=kind is int, low_open=low_open, high_open=high_open)


def _stored_config(run_dir: Path) -> dict:
    """The training config ``run.json`` stores (a :class:`MemlocError` for a corrupt file)."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text()).get("config", {})
    except (OSError, ValueError) as e:
        raise MemlocError(f"cannot read {str(Path(run_dir) / 'run.json')!r} ({e})") from None


def resumed_config(run_dir, cfg: dict | None, resume: bool) -> dict:
    """The config :func:`memloc.train` trains with: ``cfg``, and when ``resume`` finds a run in ``run_dir``,
    its stored config for every option ``cfg`` does not give (those given are checked against the stored
    ones by :func:`check_run_dir`)."""
    cfg = dict(cfg or {})
    if not (resume and (Path(run_dir) / "run.json").is_file()):     # also a creation that was interrupted
        return cfg
    stored = _stored_config(run_dir)
    if "dataset" not in stored or "model" not in stored:
        raise MemlocError(f"run {str(run_dir)!r} was not trained by memloc train (a Recorder in your own loop): "
                          "resume it in that loop (Recorder(..., resume=True))", argument="resume")
    return {**stored, **cfg}


def check_run_dir(run_dir: Path, cfg: dict, defaults: dict, resume: bool, overwrite: bool) -> bool:
    """Check ``run_dir`` before any work (rank 0 alone under torchrun); returns whether to resume.
    A resumed run's stored config must equal ``cfg`` (keys it lacks count as their ``defaults``), but
    for more ``epochs`` than stored with a schedule that does not depend on them (``constant``): the
    run is extended, as if trained for that many epochs at once."""
    check_creatable(run_dir)
    if resume and is_complete(run_dir):
        stored = _stored_config(run_dir)
        diff = {k for k in cfg if stored.get(k, defaults.get(k)) != cfg[k]}
        if "epochs" in diff:
            check_extension(run_dir, stored.get("epochs", defaults.get("epochs")), cfg)
            diff.discard("epochs")
        if diff:
            given = {k: cfg[k] for k in sorted(diff)}
            raise MemlocError("resume with settings that differ from the stored run: " + ", ".join(
                f"{{{k}}} (stored {stored.get(k, defaults.get(k))!r})" for k in given) + "; resume continues the run "
                "with its stored options: leave these out", options=given)
        return True
    if not overwrite:   # fail before any work; the Recorder clears (or overwrites) under its lock
        check_new_run_dir(run_dir, clear=False)
    return False


def check_extension(run_dir, stored: int, cfg: dict) -> None:
    """``cfg["epochs"]`` may extend a run trained for ``stored`` epochs only when the result equals
    training that many epochs at once: a schedule that does not depend on the number of epochs."""
    epochs = cfg["epochs"]
    if epochs < stored:
        raise MemlocError(f"epochs {epochs} is fewer than the {stored} the run {str(run_dir)!r} was trained for: "
                          "resume continues or extends a run, never shortens it (its checkpoints of every epoch "
                          "are in RUN/checkpoints)", argument="epochs")
    if cfg.get("schedule") != "constant":
        raise MemlocError(f"epochs {epochs} would extend a run trained for {stored} epochs with schedule "
                          f"{cfg.get('schedule')!r}, whose learning rate at every step depends on the number of epochs: "
                          f"the result would differ from training {epochs} epochs at once; train a new run for {epochs} "
                          "epochs (only runs trained with schedule 'constant' extend exactly)", argument="epochs")


def extend_config(rec, cfg: dict) -> None:
    """Record a resumed run's new number of epochs (an extension: :func:`check_extension`) in its
    ``run.json`` and ``run.h5``, by its writer ``rec`` (which holds the run's lock)."""
    if _stored_config(rec.dir).get("epochs") != cfg["epochs"]:
        rec.set_config({**_stored_config(rec.dir), "epochs": cfg["epochs"]})


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


def _etd_spec(cfg) -> dict | None:
    """Keyword arguments of :func:`memloc.core.dropout.insert_example_tied_dropout`, or None."""
    if not cfg.get("etd_after"):
        return None
    return {"after": [a.strip() for a in str(cfg["etd_after"]).split(",") if a.strip()],
            "p_gen": cfg["p_gen"], "p_mem": cfg["p_mem"], "seed": cfg["seed"], "kind": cfg["etd_kind"]}


def _with_ids(forward_context, example_ids, id_of=None):
    """``forward_context`` extended to bind the batch's example ids (``id_of[idx]`` if given) to the dropout layers."""
    @contextlib.contextmanager
    def context(model, idx):
        ids = idx if id_of is None else id_of[idx]
        with example_ids(model, ids), (contextlib.nullcontext() if forward_context is None
                                       else forward_context(model, idx)):
            yield
    return context
