"""Per-example memorisation / label-noise scores of a run.

``memloc.scores(run_or_model, data=None, *, methods="all", checkpoint=None)`` returns the
``"scores"`` result (command: ``python -m memloc scores RUN``).

Every score is a pure function (arrays in, arrays out) registered in :data:`SCORES` with its
**direction**: ``+1`` if a higher raw value means "more likely mislabeled / memorised", ``-1`` if
a lower one does. Raw values are stored; a detector ranks by ``direction * score``.

=============  ====  =========================================================================
name           dir   definition (dynamics of ``run.h5``; p = probability of the *given* label)
=============  ====  =========================================================================
final_loss     +1    cross-entropy at the end of training (final checkpoint, eval mode)
confidence     -1    mean over epochs of p at presentation, p = exp(-loss) (Swayamdipta et
                     al. 2020, dataset cartography: training-time forward passes)
variability    +1    population std over epochs of that p (cartography); memorised noisy
                     labels climb from p ~ 0 to p ~ 1, easy clean ones sit at p ~ 1
forgetting     +1    forgetting events (Toneva et al. 2019): 1 -> 0 transitions of correctness
                     between consecutive presentations; never-learned examples get the number
                     of epochs, more than any learned example can reach (ranked most forgettable)
el2n           +1    ||softmax(f(x)) - onehot(y)||_2 with the checkpoint of epoch k (Paul et al.
                     2021; one run, no averaging over seeds)
grand          +1    per-example norm of the loss gradient over all trainable parameters with the
                     checkpoint of epoch k, eval mode (Paul et al. 2021)
aum            -1    area under the margin (Pleiss et al. 2020): mean over presentations of the
                     given-label logit minus the largest other logit
neuron_count   -1    mean over repeats of the units zeroed until the prediction flipped
                     (``results/flip.h5``; not flipped = max_units + 1); NaN where not searched
                     or misclassified (Maini et al. 2023: memorised examples flip with fewer units)
tracin         +1    TracIn self-influence (TracInCP, Pruthi et al. 2020): sum over the checkpoints
                     of epochs 1..final of lr_e x ||loss gradient||^2, lr_e the learning rate of
                     epoch e (:func:`run_lrs`: the rates the run recorded, else its config's
                     schedule, else 1); one forward + backward pass over the training set per
                     checkpoint
=============  ====  =========================================================================

Epoch k (``checkpoint``) defaults to 10% of training (at least 1), as Paul et al. score at epoch
20 of 200. On the MNIST-5k runs (one-cycle schedule, 10% noise) EL2N's AUROC is 0.99 at epochs
3-6 (MLP) and 0.98-1.00 at epochs 4-15 (lenet) and falls once noisy labels are being memorised.
GraNd's per-example norms are computed in one forward and one backward pass per batch from each
layer's input and output gradient (:func:`grad_norms`, ``grad_method``); TracIn reuses them at every
checkpoint (:func:`tracin_self_influence`), so it costs one such pass per trained epoch.

A language model's run (``memloc train RUN --dataset tinymem:...``) is scored per training sequence,
its memorisation targets in the noisy examples' role (:mod:`.tasks`): the loss is the suffix loss,
correctness exact memorisation (forgetting counts memorised -> not), p = exp(-suffix loss) (the geometric
mean of the suffix tokens' probabilities), EL2N the mean over suffix positions of ||softmax - onehot||_2,
GraNd and TracIn the gradient of the suffix loss (:class:`.tasks.SuffixLoss`), neuron_count the units
flip zeroes until the suffix is no longer reproduced. aum does not apply (no recorded margins). Each score's ``sequences`` text says its meaning.

The ``"scores"`` result has one variable per score over the ``example`` dimension, with
attributes ``description``, ``direction`` (and ``epoch`` for el2n / grand).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import xarray as xr
from torch import nn

from ...scale.distributed import world
from ...core.errors import MemlocError
from ...core.inputs import as_data
from ...scale.parts import parts_folder
from ...core.precision import check_precision
from ...core.results import Result
from ...core.run import Run, as_run
from ...core.runtime import check_range, resolve_device, split_list
from ...core.selection import resolve
from ...core.sequences import SequenceSet
from .functions import aum, confidence, el2n, final_loss, forgetting_events, neuron_count, variability
from .gradnorm import GRAD_NORM_METHODS, grad_norms
from .passes import GRAD_NORMS
from .inputs import Inputs as _Inputs
from .tasks import ClassifierTask, SequenceTask
from .tracin import checkpoint_lrs, run_lrs, tracin_self_influence
from ...core.run import load
from ...core.options import add_precision, nonnegative_int, positive_int
from ...core.schemas import Schema, Var, EXAMPLE_VAR, SCORE_NAMES
from ...core.registry import Analysis, Command
from ...core.deprecation import renamed
from ...core.prerequisites import missing_result
from ...core.store import stored

__all__ = ["final_loss", "confidence", "variability", "forgetting_events", "el2n", "aum", "neuron_count",
           "grad_norms", "GRAD_NORM_METHODS", "tracin_self_influence", "checkpoint_lrs", "run_lrs", "Score", "SCORES",
           "default_epoch_k", "scores", "select_scores"]


@dataclass(frozen=True)
class Score:
    """A registered score: the pure function, how to feed it, its direction."""

    func: Callable
    compute: Callable[[_Inputs], np.ndarray]
    direction: int          # +1: higher = more likely noisy; -1: lower = more likely noisy
    description: str
    at_epoch_k: bool = False
    passes: Callable[[_Inputs], list] | None = None     # the expensive passes (kind, epoch) it reads
    sequences: str = ""         # its meaning on a language model's sequences, or
    not_for_sequences: str = ""     # why it does not apply to them


SCORES: dict[str, Score] = {
    "final_loss": Score(final_loss, lambda i: final_loss(i.dynamics("loss", "end")), +1,
                        "cross-entropy of the given label at the end of training (final checkpoint, eval mode)",
                        sequences="suffix loss at the end of training (final checkpoint, eval mode)"),
    "confidence": Score(confidence, lambda i: confidence(i.presentation("loss")), -1,
                        "cartography confidence: mean over epochs of p(given label) at presentation",
                        sequences="cartography confidence: mean over epochs of exp(-suffix loss) at presentation "
                                  "(the geometric mean of the suffix tokens' probabilities)"),
    "variability": Score(variability, lambda i: variability(i.presentation("loss")), +1,
                         "cartography variability: std over epochs of p(given label) at presentation",
                         sequences="cartography variability: std over epochs of exp(-suffix loss) at presentation"),
    "forgetting": Score(forgetting_events, lambda i: forgetting_events(i.presentation("correct")), +1,
                        "forgetting events (1 -> 0 between consecutive presentations); "
                        "never learned = number of epochs",
                        sequences="forgetting events of exact memorisation (memorised -> not between consecutive "
                                  "presentations); never memorised = number of epochs"),
    "el2n": Score(el2n, lambda i: i.el2n(), +1,
                  "EL2N: ||softmax - onehot(given label)||_2 at epoch k", at_epoch_k=True,
                  passes=lambda i: [(i.task.el2n_kind, i.model_epoch)],
                  sequences="EL2N: mean over the suffix positions of ||softmax - onehot(suffix token)||_2 at epoch k"),
    "grand": Score(grad_norms, lambda i: i.passes[GRAD_NORMS, i.model_epoch], +1,
                   "GraNd: per-example loss-gradient norm over all parameters at epoch k (eval mode)",
                   at_epoch_k=True, passes=lambda i: [(GRAD_NORMS, i.model_epoch)],
                   sequences="GraNd: per-sequence norm of the suffix loss's gradient over all parameters at epoch k "
                             "(eval mode)"),
    "aum": Score(aum, lambda i: aum(i.presentation("margin")), -1,
                 "area under the margin: mean over presentations of given-label logit minus largest other",
                 not_for_sequences="a language model's run records no margins at presentation"),
    "neuron_count": Score(neuron_count, lambda i: i.neuron_count(), -1,
                          "units zeroed until the prediction flips (mean over repeats; not flipped = "
                          "max_units + 1; NaN = not searched)",
                          sequences="units zeroed until the suffix is no longer reproduced exactly (memloc.flip on "
                                    "the run; not broken = max_units + 1; NaN = not searched)"),
    "tracin": Score(tracin_self_influence, lambda i: i.tracin(), +1,
                    "TracIn self-influence: sum over checkpoints 1..final of lr x ||loss gradient||^2 "
                    "(eval mode; weights in config tracin_weights)",
                    passes=lambda i: [(GRAD_NORMS, e) for e in i.tracin_epochs()],
                    sequences="TracIn self-influence: sum over checkpoints 1..final of lr x ||suffix-loss gradient||^2 "
                              "(eval mode; weights in config tracin_weights)"),
}
MODEL_SCORES = ("el2n", "grand")


def default_epoch_k(final_epoch: int) -> int:
    """Epoch of the EL2N / GraNd checkpoint: 10% of training (Paul et al. use epoch 20 of 200), >= 1."""
    return min(final_epoch, max(1, round(0.1 * final_epoch)))


def select_scores(names, run: Run | None, *, sequences: bool | None = None) -> list[str]:
    """Score names from ``"all"`` (every score whose inputs exist) or a list / comma-separated string.
    ``sequences``: a language model's (default: ``run.is_lm``); the scores that do not apply to them
    are left out of ``"all"`` and refused by name."""
    lm = bool(run is not None and run.is_lm) if sequences is None else sequences
    if names in (None, "all", ["all"]):
        if run is None:
            return list(MODEL_SCORES)
        return [n for n in SCORES if not (lm and SCORES[n].not_for_sequences)
                and (n != "neuron_count" or run.results_path("flip").is_file())]
    names = split_list(names)
    bad = [n for n in names if n not in SCORES]
    if bad or not names:
        raise MemlocError(f"unknown score {', '.join(map(repr, bad)) or '(none given)'}; "
                          f"valid: all, {', '.join(SCORES)}", argument="methods")
    if lm:
        bad = [n for n in names if SCORES[n].not_for_sequences]
        if bad:
            raise MemlocError(f"score {bad[0]!r} does not apply to a language model's sequences "
                              f"({SCORES[bad[0]].not_for_sequences}); valid for them: all, "
                              f"{', '.join(n for n in SCORES if not SCORES[n].not_for_sequences)}", argument="methods")
    return list(dict.fromkeys(names))


@renamed(names="methods", checkpoint_k="checkpoint", batch_size="eval_batch_size", resume_dir="resume")
@stored('scores')
def scores(source, data=None, *, methods="all", checkpoint: int | None = None, grad_method: str = "hooks",
           eval_batch_size: int = 1024, device="auto", resume=None, overwrite: bool = False,
           precision: str = "fp32") -> Result | None:
    """Scores of every training example: the ``"scores"`` result, one (example,) variable per score.

    ``source``: a :class:`memloc.Run` / run path (a classifier's or a language model's: then per
    sequence, module docstring), or an ``nn.Module`` with ``data`` (a classifier's data or a language
    model's :class:`memloc.core.sequences.SequenceSet`; then only the model scores el2n and grand,
    computed on that model). ``methods``: ``"all"`` (every score whose inputs exist: neuron_count only
    with a flip result; neither it nor aum for sequences) or names of :data:`SCORES`; tracin (runs
    only) takes one forward + backward pass over the training set per checkpoint and records its
    checkpoints and weights in the config (``tracin_epochs``, ``tracin_weights``, and where the weights
    came from, ``tracin_weights_from``: ``recorded``, ``config schedule`` or ``none: 1``).
    ``checkpoint``: the checkpoint epoch of el2n and grand (default :func:`default_epoch_k`).
    ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``): el2n's forward passes under autocast
    (:mod:`memloc.core.precision`); the per-example gradient norms (grand, tracin) stay float32, the
    dynamics scores read what training recorded.

    The expensive passes (the logits of el2n, the gradient norms of grand and of every tracin
    checkpoint) are computed in cells of whole batches (:mod:`memloc.analyses.scores.passes`).
    ``resume``: folder of resumable part files (:class:`memloc.scale.parts.Parts`; ``"auto"``:
    ``RUN/results/scores.partial`` for a run, as ``memloc scores`` uses; None, the default: nothing
    saved in one process): each finished cell is saved there, and a rerun with the same settings
    takes it instead of recomputing it (``overwrite`` discards parts made with other settings);
    they are deleted when the result is saved (:meth:`memloc.Result.save`). Under torchrun
    (:mod:`memloc.scale.distributed`) the cells are split across the processes (None then means
    ``"auto"``) and rank 0 returns the merged result (equal to one process's), the other ranks None.
    """
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    if not isinstance(grad_method, str) or grad_method not in GRAD_NORM_METHODS:
        raise MemlocError(f"unknown grad_method {grad_method!r}; valid: {', '.join(GRAD_NORM_METHODS)}",
                          argument="grad_method")
    check_precision(precision)
    if isinstance(source, nn.Module) and isinstance(data, SequenceSet):     # a language model and its sequences
        dev = resolve_device(device)
        run, model, data, n = None, copy.deepcopy(source).to(dev).eval(), data.to(dev), len(data)
    elif isinstance(source, nn.Module):
        src = resolve(source, data, device=device)
        run, model, data, dev, n = None, src.model, src.data, src.device, len(src.data.label_given)
    else:
        run, model, dev = as_run(source), None, resolve_device(device)
        n = run.num_train
        if data is not None and not hasattr(data, "to"):
            data = as_data(data)        # a tuple of tensors, or refused in one line
    lm = isinstance(data, SequenceSet) or (run is not None and run.is_lm)
    chosen = select_scores(methods, run, sequences=lm)
    task = ClassifierTask()
    if lm:
        info = data if run is None else run.info
        task = SequenceTask(*((data.prefix_len, data.suffix_len) if run is None
                              else (info["prefix_len"], info["suffix_len"])))
    epoch_k = None
    if run is not None:
        epoch_k = default_epoch_k(run.final_epoch) if checkpoint is None else checkpoint
        epoch_k = check_range("checkpoint", epoch_k, low=0, high=run.final_epoch, integer=True)
    inp = _Inputs(run, model, data, epoch_k=epoch_k, device=dev, batch_size=eval_batch_size, grad_method=grad_method,
                  precision=check_precision(precision, dev), task=task, num_examples=n)
    # the scores read from the run first, on every rank: their errors stop all before any pass
    computed = {name: SCORES[name].compute(inp) for name in chosen if SCORES[name].passes is None}
    passes = [p for name in chosen if SCORES[name].passes is not None for p in SCORES[name].passes(inp)]
    if passes and not inp.run_passes(passes, folder=parts_folder(resume, run, "scores"), overwrite=overwrite):
        return None                 # rank 0 merges the passes and returns the result
    if world()[0] > 0:
        return None
    variables = {}
    for name in chosen:
        values = np.asarray(computed[name] if name in computed else SCORES[name].compute(inp), dtype=np.float64)
        if values.shape != (n,):
            raise AssertionError(f"score {name} has shape {values.shape}, expected ({n},)")
        s = SCORES[name]
        attrs = {"description": s.sequences if lm else s.description, "direction": s.direction}
        if s.at_epoch_k:
            attrs["epoch"] = -1 if epoch_k is None else int(epoch_k)
        variables[name] = xr.Variable(("example",), values, attrs)
    ds = xr.Dataset(variables, coords={"example": np.arange(n)})
    config = {"checkpoint_k": epoch_k, "scores": chosen, "grad_method": grad_method, "batch_size": eval_batch_size,
              "device": str(dev), "precision": precision, **inp.tracin_config}
    if lm:
        config["examples"] = "sequences"    # the scores are of a language model's sequences (targets = noisy)
    result = Result("scores", ds, config=config)
    return result


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--scores", default="all",
                   help="comma-separated score names, or 'all' (neuron_count only if results/flip.h5 "
                        f"exists); names: {', '.join(SCORES)}")
    p.add_argument("--checkpoint-k", type=nonnegative_int, default=None,
                   help="checkpoint epoch of el2n and grand (default: 10%% of training, at least 1)")
    p.add_argument("--grad-method", default="hooks", choices=list(GRAD_NORM_METHODS),
                   help="per-example gradient norms for grand: hooks = per-layer norm tricks, "
                        "vmap = torch.func over the whole model, loop = one backward per example")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="examples per forward pass (el2n, grand, tracin)")
    add_precision(p, "run el2n's forward passes under autocast in bf16 or fp16 (the gradient norms of grand and "
                     "tracin stay fp32; the dynamics scores read what training recorded); fp32 (default) computes "
                     "exactly as without this option")


def _cli_execute(args):
    run = load(args.run)
    if args.scores == "all" and world()[0] == 0:
        if run.is_lm:
            print("memloc scores: a language model's run (suffix loss for the loss; targets = noisy); "
                  + "; ".join(f"{n} skipped: {s.not_for_sequences}" for n, s in SCORES.items() if s.not_for_sequences))
        elif "neuron_count" not in select_scores("all", run):
            print(f"memloc scores: neuron_count skipped ({missing_result(run, 'flip')})")
    return scores(run, methods=args.scores, checkpoint=args.checkpoint_k, grad_method=args.grad_method,
                  eval_batch_size=args.batch_size, device=args.device, resume="auto", overwrite=args.overwrite,
                  precision=args.precision)


def _cli_summary(res, args):
    lines = []
    for name in res.data_vars:
        v = res[name].values
        ok = np.isfinite(v)
        lines.append(f"{name:<13} dir {int(res[name].attrs['direction']):+d}  defined {ok.sum():>6}/{len(v)}  "
                     f"mean {np.mean(v[ok]) if ok.any() else float('nan'):.4g}")
    return "\n".join(lines)


ANALYSIS = Analysis(
    name="scores", order=60, compute=scores,
    schema=Schema("scores", "per-example memorisation / label-noise scores (memloc.scores)",
                  dict(EXAMPLE_VAR),
                  {name: Var(("example",), f"score {name} (see memloc.analyses.scores.SCORES)", optional=True) for name in SCORE_NAMES},
                  {"direction": "+1: higher = more likely mislabeled, -1: lower is",
                   "epoch": "checkpoint epoch (el2n, grand)"}),
    command=Command(name="scores", group="finding", example="memloc scores RUN --scores final_loss,forgetting,aum",
                    help='per-example memorisation scores (loss, forgetting, EL2N, GraNd, AUM, neuron count...)',
                    description="Per-example memorisation / label-noise scores of a run, written to RUN/results/scores.h5 (raw "
                                "values plus each score's direction: +1 = higher means more likely mislabeled, -1 = lower does).",
                    flags={"methods": "--scores", "checkpoint": "--checkpoint-k", "eval_batch_size": "--batch-size"},
                    sharded=True,
                    interrupted="finished work is saved (rerun to continue)",
                    overwrite_help="replace an existing scores.h5 (or an interrupted scores run saved with other settings)",
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
