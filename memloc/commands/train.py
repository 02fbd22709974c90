"""``memloc train RUN``: train under label noise into a run directory (:func:`memloc.train`)."""
import shutil
from pathlib import Path

from ..data import NOISE_KINDS
from ..errors import MemlocError
from ..train import DEFAULTS, OPTIONS, RANGES, train
from .runner import add_eval_batch_size, number

OVERWRITE = True
INTERRUPTED = "finished epochs are saved (rerun with --resume to continue)"
OVERWRITE_HELP = "delete an existing run directory (one holding run.json) and train anew"
DESCRIPTION = "Train a classifier under label noise into a memloc run directory (checkpoint every epoch, per-example dynamics)."


def arguments(p):
    for key, (default, text) in OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=text)
        elif key == "noise_kind":
            p.add_argument(flag, default=default, choices=NOISE_KINDS, help=text)
        elif key in RANGES:
            kind, low, high, low_open, high_open = RANGES[key]
            p.add_argument(flag, type=number(kind, low, high, low_open=low_open, high_open=high_open),
                           default=default, help=text)
        else:
            p.add_argument(flag, default=default, help=text)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    add_eval_batch_size(p)


def execute(args):
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    if cfg["test_size"] is not None and cfg["test_size"] >= 1:
        cfg["test_size"] = int(cfg["test_size"])
    run_dir = Path(args.run)
    if args.overwrite and run_dir.exists():
        if args.resume:
            raise MemlocError("resume=True and overwrite=True exclude each other")
        if not (run_dir / "run.json").is_file():
            raise MemlocError(f"{str(run_dir)!r} is not a memloc run directory; not deleting it", argument="overwrite")
        shutil.rmtree(run_dir)
    return train(run_dir, cfg, device=args.device, resume=args.resume, argv=args.argv,
                 eval_batch_size=args.eval_batch_size)


def summary(run, args):
    m = run.metrics()
    return (f"{run.path}: {run.final_epoch} epochs; train {m['train_accuracy'][-1]:.4f}, "
            f"clean {m['clean_accuracy'][-1]:.4f}, noisy (memorised) {m['noisy_accuracy'][-1]:.4f}, "
            f"test {m['test_accuracy'][-1]:.4f}")
