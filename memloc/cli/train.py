"""``memloc train RUN``: train under label noise (or a language model on a sequence corpus) into a run
directory (:func:`memloc.train`)."""
import argparse

from ..core.data import NOISE_KINDS
from ..training.lm import LM_OPTIONS, LM_RANGES, LM_SHARED
from ..training.train import DEFAULTS, OPTIONS, RANGES, train
from ..core.options import add_eval_batch_size, add_precision, number
from ..core.registry import Command
from .runner import parser

DESCRIPTION = ("Train a classifier under label noise into a memloc run directory (checkpoint every epoch, "
               "per-example dynamics). Under torchrun --nproc-per-node K, one run is trained with "
               "DistributedDataParallel: each batch of --batch-size examples is split into K slices, the "
               "evaluation passes by batches, and rank 0 alone writes RUN; equal to one process up to "
               "rounding, except batch norm on the "
               "CPU (per-process statistics; on CUDA it becomes SyncBatchNorm) and standard dropout "
               "(per-process noise). With --dataset tinymem:increment, tinymem:mult, canaries:stdlib (secrets "
               "planted --repeats times into the standard library's source, byte tokens) or textfile:PATH (a UTF-8 "
               "file in byte chunks, with --inject FILE planting COUNT<TAB>TEXT lines) it trains a causal "
               "language model (--model gpt, hf:gpt2, hf:gpt_neox or hf:llama, sized by --n-layer / --d-model / "
               "--n-head; AdamW with a warm-up + cosine schedule by default) and records per sequence and epoch "
               "the suffix loss, suffix token accuracy and exact memorisation (greedy decoding from the prefix "
               "reproduces the suffix), with the held-out rule accuracy per epoch; one process.")


def arguments(p):
    ranges = {**LM_RANGES, **RANGES}
    for key, (default, text) in {**OPTIONS, **LM_OPTIONS}.items():
        if key in LM_SHARED and LM_SHARED[key] != default:
            text = f"{text} (language models: {LM_SHARED[key]})"
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=text)
        elif key == "noise_kind":
            p.add_argument(flag, default=default, choices=NOISE_KINDS, help=text)
        elif key == "precision":
            add_precision(p, text)
        elif key in ranges:
            kind, low, high, low_open, high_open = ranges[key]
            p.add_argument(flag, type=number(kind, low, high, low_open=low_open, high_open=high_open),
                           default=default, help=text)
        else:
            p.add_argument(flag, default=default, help=text)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last epoch with the options it stored (give none, or "
                        "the same values; a differing one is an error); a larger --epochs extends a finished run "
                        "trained with --schedule constant (as if trained that long at once)")
    add_eval_batch_size(p)


def _given(argv) -> set[str]:
    """The options this command line sets explicitly (a --recipe fills only the others): the same
    parser, with every default suppressed."""
    p = parser(COMMAND)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def execute(args):
    given = _given(args.argv[2:])
    cfg = {k: getattr(args, k) for k in (*DEFAULTS, *LM_OPTIONS) if k in given}   # the library fills the rest
    if cfg.get("test_size") is not None and cfg["test_size"] >= 1 and float(cfg["test_size"]).is_integer():
        cfg["test_size"] = int(cfg["test_size"])
    return train(args.run, cfg, device=args.device, resume=args.resume, overwrite=args.overwrite, argv=args.argv,
                 eval_batch_size=args.eval_batch_size)


def summary(run, args):
    m = run.metrics()
    if run.is_lm:     # a rule only tinymem's sequences follow
        rule = (f"rule accuracy {m['test_rule_accuracy'][-1]:.4f}, "     # recorded for tinymem runs only
                if "test_rule_accuracy" in m and str(run.config.get("dataset", "tinymem")).startswith("tinymem") else "")
        return (f"{run.path}: {run.final_epoch} epochs; memorised: targets {m['target_memorised'][-1]:.4f}, "
                f"clean {m['clean_memorised'][-1]:.4f}; held-out {rule}token accuracy {m['test_accuracy'][-1]:.4f}")
    noisy = (f"noisy (memorised) {m['noisy_accuracy'][-1]:.4f}" if run.is_noisy.any()
             else "no known noisy labels (memloc issues finds the suspects)")
    return (f"{run.path}: {run.final_epoch} epochs; train {m['train_accuracy'][-1]:.4f}, "
            f"clean {m['clean_accuracy'][-1]:.4f}, {noisy}, test {m['test_accuracy'][-1]:.4f}")


COMMAND = Command(
    name="train", group="runs", example="memloc train RUN --dataset digits --model mlp --epochs 20", order=10,
    help="train a model under label noise into a run directory",
    description=DESCRIPTION, arguments=arguments, execute=execute, summary=summary,
    sharded=True,    # torchrun --nproc-per-node K -m memloc train RUN: one run, each batch split K ways (DDP)
    overwrite=True, interrupted="finished epochs are saved (rerun with --resume to continue)",
    overwrite_help=("replace the memloc run in RUN (only after every check passed; files memloc did not write "
                    "are never deleted)"))
