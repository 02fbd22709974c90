"""``memloc flip RUN``: greedy gradient-guided unit zeroing (:func:`memloc.flip`)."""
import sys

import numpy as np

from ..analyses.flip import DTYPES, REF_POOLS, flip
from ..analyses.flip.driver import PROTOCOLS, SITES, part_settings, protocol_options, settings
from ..scale.parts import canonical_settings, saved_settings
from ..core.run import load
from .runner import add_eval_batch_size, add_precision, nonnegative_float, nonnegative_int, number, positive_int

RESULT = "flip"
SHARDED = True     # torchrun --nproc-per-node K -m memloc flip RUN: every K-th example (its repeats) per process
DESCRIPTION = ("Greedy gradient-guided unit zeroing: for each example, zero units (or, with --site weight, "
               "parameter items as in the authors' code) one at a time (the one whose "
               "zeroing most raises the example's loss relative to a reference batch's loss, to first order) "
               "until the prediction changes. Writes RUN/results/flip.h5; an interrupted run continues when the "
               "same command is run again. Under torchrun (torchrun --nproc-per-node K -m memloc flip RUN ...) the "
               "searches are split across the K processes and rank 0 writes the merged result.")
INTERRUPTED = "finished searches are saved (rerun to continue)"
OVERWRITE_HELP = "replace an existing flip.h5 (or an interrupted search) made with other settings"


def arguments(p):
    p.add_argument("--examples", default="noisy:100,clean:100",
                   help="which training examples to search: comma-separated terms, each POOL:COUNT (POOL = noisy, "
                        "clean or any; COUNT a number or 'all'; drawn with --seed), an example id (17), an inclusive "
                        "id range (10-19), or ids prefixed by 'ids:' (ids:1,5,9). Examples the model misclassifies "
                        "are recorded with status 1 and not searched")
    p.add_argument("--checkpoint", type=nonnegative_int, default=None,
                   help="checkpoint epoch to analyse (default: the final one)")
    p.add_argument("--max-units", type=positive_int, default=100,
                   help="give up after zeroing this many units (recorded as not flipped)")
    p.add_argument("--protocol", default="memloc", choices=list(PROTOCOLS),
                   help="defaults of the six options below: memloc (site pre_norm, no noise, B = 64) or paper (the "
                        "authors' released code: site weight, logits averaged over 5 noised copies, B = 512, capped "
                        "at the clean pool); options given explicitly always win")
    p.add_argument("--site", default=None, choices=SITES,
                   help="what is zeroed: a unit at its layer's output (pre_norm, memloc's default: one channel / "
                        "feature, comparable across layers), after the norm that follows it (post_norm), or a "
                        "parameter item by the official rule (weight: a whole conv filter, any other weight, bias or "
                        "norm scale / shift element by element, scored by weight x gradient)")
    p.add_argument("--noise-samples", type=nonnegative_int, default=None,
                   help="average the target's logits over this many Gaussian-noised copies of it (0 = off; "
                        "default 0, paper protocol 5)")
    p.add_argument("--noise-ratio", type=nonnegative_float, default=None,
                   help="noise norm as a fraction of the input's norm (default 0.01)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="searches per example, each with its own reference batch (default 1)")
    p.add_argument("--ref-batch-size", type=positive_int, default=None,
                   help="reference batch size B (the objective is the reference batch's mean loss minus the "
                        "example's loss; default 64, paper protocol 512)")
    p.add_argument("--ref-pool", default=None, choices=REF_POOLS,
                   help="draw reference batches from clean training examples (default) or from all of them")
    p.add_argument("--collateral", action="store_true",
                   help="also record clean-train / noisy-train / noisy-true / test accuracy with each example's "
                        "units zeroed (one pass over the data per search)")
    p.add_argument("--group-size", type=positive_int, default=32,
                   help="searches run at once (memory grows with group size x (B + copies))")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="computation precision; float64 makes the unit sequences independent of --group-size "
                        "and of interruptions (near-ties are not decided by rounding), at 2-4x the CPU time")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed of example sampling, reference batches and noise")
    add_eval_batch_size(p)
    add_precision(p, "run the searches' forward passes under autocast in bf16 or fp16 (faster on GPUs with tensor "
                     "cores; unit sequences can differ from fp32 at near-ties; needs --dtype float32); fp32 (default) "
                     "computes exactly as without this option")


PROTOCOL_OPTIONS = ("site", "noise_samples", "noise_ratio", "repeats", "ref_batch_size", "ref_pool")


def _options(args) -> dict:
    return dict(examples=args.examples, checkpoint=args.checkpoint, max_units=args.max_units,
                collateral=args.collateral, group_size=args.group_size, seed=args.seed, dtype=args.dtype,
                precision=args.precision,
                protocol=args.protocol, **{k: getattr(args, k) for k in PROTOCOL_OPTIONS})


def _requested(args, run):
    """The config and part-file settings this command would search with."""
    options = {k: v for k, v in _options(args).items() if k not in ("group_size", "protocol") + PROTOCOL_OPTIONS}
    options.update(protocol_options(args.protocol, run.is_noisy, **{k: getattr(args, k) for k in PROTOCOL_OPTIONS}))
    options["checkpoint"] = run.final_epoch if args.checkpoint is None else args.checkpoint
    config, ids, _ = settings(run.is_noisy, **options)
    return config, part_settings(config, ids)


def already_done(args, run) -> bool:
    """Does the saved flip result hold exactly these settings?"""
    stored = {"precision": "fp32", **run.result("flip").config}     # results from before --precision: fp32
    return all(stored.get(k) == v for k, v in _requested(args, run)[0].items())


def resumable(args, run) -> bool:
    """Is an interrupted search with exactly these settings saved (e.g. one started with --overwrite)?"""
    parts = run.results_path("flip").with_name("flip.partial")
    return saved_settings(parts) == canonical_settings(_requested(args, run)[1])


def execute(args):
    return flip(load(args.run), **_options(args), eval_batch_size=args.eval_batch_size, device=args.device,
                overwrite=args.overwrite, log=lambda message: print(message, file=sys.stderr))


def summary(res, args):
    searched = res["status"].values == 0
    noisy = res["is_noisy"].values.astype(bool)
    count = res["neuron_count"].values
    parts = [f"{searched.sum()} of {res.sizes['example']} examples searched"]
    word = "items" if res.config.get("site") == "weight" else "units"
    for key, rows in (("noisy", searched & noisy), ("clean", searched & ~noisy)):
        if rows.any():
            parts.append(f"{key}: median {np.median(count[rows]):g} {word}, "
                         f"{100 * res['flipped'].values[rows].mean():.0f}% flipped")
    return "; ".join(parts)
