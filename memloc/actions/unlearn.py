"""Unlearning memorised labels from a trained model, with continual-learning protection.

``memloc.unlearn(run, *, forget="noisy"|"flagged"|"ids:1,2,3", methods=...)`` (command:
``python -m memloc unlearn RUN``) starts every method from the final checkpoint; the *retain* set
is every other training example. Methods (:data:`METHODS`):

=============  =================================================================================
finetune       SGD on the retain set (``epochs``, ``lr``, momentum 0.9, constant lr; ``optimizer``)
ascent         gradient *ascent* on the forget set's given labels (``ascent_epochs`` passes at
               ``ascent_lr``: larger steps destroy the model)
ewc            finetune + (lambda / 2) sum_i F_i (theta_i - theta*_i)^2, F = diagonal Fisher of the
               retain set at theta* (Kirkpatrick et al. 2017), divided by its maximum
mas            finetune + (lambda / 2) sum_i Omega_i (theta_i - theta*_i)^2, Omega = MAS importance
               of the retain set (Aljundi et al. 2018), divided by its maximum (so lambda is on one
               scale for both and lr x lambda < 2 keeps the penalty's steps stable)
lwf            finetune + lambda T^2 KL(p_old^T || p_new^T) on retain batches, T = 2: distillation
               from the original model's outputs (Li & Hoiem 2017)
zero           the union of the forget set's flip units zeroed (Maini et al. 2023, section 2.4;
               needs ``results/flip.h5``; the units of forget examples flip searched)
retrain_layer  one layer reset to initialisation and retrained alone on the retain set (section
               2.3); the layer whose retraining left the fewest noisy labels in
               ``results/retrain.h5``, else the first layer
etd_drop       a run trained with example-tied dropout (``train --etd-after``) evaluated in drop
               mode: its memorisation units dropped (Maini et al. 2023, section 4)
=============  =================================================================================

Optimiser: ``optimizer="sgd"`` (momentum 0.9) or ``"adam"`` (AdamW, no weight decay) for every
fine-tuning method and ascent. Unset, a classifier's run takes SGD at ``lr`` 0.01 / ``ascent_lr`` 0.003
and 5 epochs (:data:`HYPER`); a language model's run (trained with AdamW, on whose scale those SGD rates
leave 90-98% of the targets memorised) takes its own training optimiser and lr, ascent at
:data:`memloc.actions.continual.LM_ASCENT` x that lr and ``LM_EPOCHS`` (20) epochs (measured:
:func:`memloc.actions.continual.optimiser_settings`). The result's config records ``optimizer``, ``lr``,
``ascent_lr``, ``epochs`` and where they came from (``defaults``).

Conventions: both penalties are (lambda / 2) sum w (theta - theta*)^2 (Aljundi et al. write MAS
without the 1/2); LwF is Hinton's T^2-scaled KL (Li & Hoiem weight a T-softened cross-entropy
without T^2, so lambda = 1 here is 4x theirs at T = 2).

``forget="flagged"`` uses no ground truth to choose the examples, but two methods read results
that did: ``retrain_layer`` picks its layer from ``results/retrain.h5`` (the noisy subset of the
run's noise mask) and ``zero`` uses the flip searches that exist (usually of noisy examples).

``methods=None`` (default) runs every method whose inputs exist (zero: a flip result; etd_drop:
dropout layers). In runs with example-tied dropout the fine-tuning methods run its layers in test
mode (memorisation units scaled by p_mem), which needs no example ids.

Each is measured on: ``forget_given`` (accuracy on the forget set w.r.t. the given labels: the
memorisation left), ``forget_true`` (w.r.t. the true labels), ``retain`` (given labels) and
``test``; plus wall time and passes over the training data. ``forget="flagged"`` uses the flags
of ``memloc issues`` (``results/issues.h5``), so the loop runs without ground truth.

On a language model's run (:mod:`memloc.core.tasks`) the forget set is the memorisation targets
(``forget="noisy"``) and the retain set the other training sequences: fine-tuning and ascent take the
suffix loss, EWC / MAS the importance of the retain set's suffixes, LwF distils the logits of every
position up to the suffix's end, retrain_layer retrains its layer with the next-token loss on the retain
set (:func:`memloc.retrain`'s). The groups (:attr:`memloc.core.tasks.SequenceTask.groups`):
``forget_given`` the memorised share of the forget set (greedy decoding reproduces the suffix),
``forget_true`` the share of it whose greedy continuation follows the corpus' rule (TinyMem; else NaN),
``retain`` its memorised share, ``test`` the held-out suffix token accuracy, ``test_rule`` the share of
held-out suffixes reproduced (TinyMem's rule accuracy).
"""
from __future__ import annotations

import copy
import time
import warnings
from functools import partial

import numpy as np
import torch
import xarray as xr

from ..core.errors import MemlocError
from ..core.precision import autocast, check_precision, laid_out
from ..core.tasks import ClassifierTask, example_input, select_rows, task_of, with_targets
from ..core.results import Result
from ..core.run import as_run
from ..core.prerequisites import command_line, missing_result, needed_result
from ..core.runtime import check_choices, check_range, progress, resolve_device
from ..core.options import TRAINING_PASSES, add_precision, mean_se, nonnegative_float, number, positive_float, positive_int
from .unlearn_plots import _layer_note, draw_pareto, plot_unlearn  # noqa: F401 (draw_pareto: scripts)
from ..core.schemas import Schema, Var
from ..core.registry import Analysis, Command
from ..core.deprecation import renamed
from ..core.store import stored
from ..core.optim import OPTIMIZERS
from .continual import (LM_ASCENT, LM_EPOCHS, TEMPERATURE, distillation_loss, distillation_term, finetune, optimiser_settings,  # noqa: F401
                        penalty_term, protection_weights, quadratic_penalty)

__all__ = ["METHODS", "GROUPS", "HYPER", "available_methods", "quadratic_penalty", "distillation_loss",
           "protection_weights", "penalty_term", "distillation_term", "finetune", "unlearn"]

METHODS = ("finetune", "ascent", "ewc", "mas", "lwf", "zero", "retrain_layer", "etd_drop")
GROUPS = ClassifierTask.groups     # a language model's: SequenceTask.groups
HYPER = dict(epochs=5, lr=0.01, batch_size=128, momentum=0.9, lam={"ewc": 10.0, "mas": 10.0, "lwf": 1.0},
             temperature=TEMPERATURE, ascent_lr=0.003, ascent_epochs=3)


def _groups(task, model, forget, retain, *, mask_context=None, batch_size: int = 1024,
            precision: str = "fp32") -> np.ndarray:
    import contextlib
    ctx = mask_context or contextlib.nullcontext
    with ctx(), autocast(precision, next(model.parameters()).device):
        return task.group_row(model, forget, retain, batch_size=batch_size)


def _zero_context(run, model, data, forget):
    from ..analyses.importance import flip_units
    from ..core.neurons import unit_structure
    from ..core.units import unit_masks
    units = flip_units(run, examples=forget)
    if units is None:
        raise missing_result(run, "flip", "methods: zero", argument="methods", hint="on the forget examples")
    if not len(units):
        raise MemlocError("methods: zero needs flip searches of forget examples that flipped; flip has none: run "
                          "memloc flip on them first", argument="methods")
    config = run.result("flip").config
    site = config.get("site", "pre_norm")
    if site == "weight":     # the flip searches zeroed parameter items (the official rule)
        from ..analyses.flip.weights import weight_items, weight_masks
        structure = weight_items(model, [str(k) for k in run.result("flip")["layer"].values])   # its items' parameters
        zeroing = weight_masks
    else:
        structure = unit_structure(model, example_input(data), config.get("units", "outputs"))   # flip's units
        zeroing = partial(unit_masks, site=site)
    mask = torch.ones(structure.n_units, device=next(model.parameters()).device)
    mask[torch.as_tensor(units, device=mask.device)] = 0
    return (lambda: zeroing(model, structure, mask)), units


def critical_layer(run, structure) -> tuple:
    """``(layer, why)``: the layer whose retraining left the fewest noisy labels in ``results/retrain.h5``
    (which uses the run's noise mask), else the first layer, with a warning (the choice is recorded
    in the result's config as ``retrain_layer`` and shown by its summary and report)."""
    layer = _retrained_best(run, structure)
    if layer is not None:
        return layer, "results/retrain.h5: its retraining left the fewest noisy labels"
    warnings.warn(f"retrain_layer: no usable results/retrain.h5 in {str(run.path)!r}, so the first layer "
                  f"({structure.layers[0].name}) is retrained; run {command_line(run, 'retrain')} first to retrain "
                  "the most critical one")
    return structure.layers[0], "the first layer (no retrain result: run memloc retrain first)"


def _retrained_best(run, structure):
    if run.results_path("retrain").is_file():
        res = run.result("retrain")
        acc = res["accuracy"].sel(subset="noisy").isel(epoch=-1).values
        name = str(res["layer"].values[int(np.nanargmin(acc))]) if np.isfinite(acc).any() else None
        if name in structure.layer_names:
            return structure.layer(name)
    return None


def available_methods(run) -> list[str]:
    """The methods whose inputs ``run`` has (zero: a flip result; etd_drop: example-tied dropout layers)."""
    return [m for m in METHODS if m not in unavailable_methods(run)]


def unavailable_methods(run) -> dict[str, str]:
    """Method -> why ``run`` lacks its input (what "all" methods leave out; recorded in the result's config as
    ``skipped`` and said by its summary and report)."""
    out = {}
    if not run.results_path("flip").is_file():
        out["zero"] = str(missing_result(run, "flip", "zero"))
    if not run.info.get("model", {}).get("etd"):
        out["etd_drop"] = "the run has no example-tied dropout layers (train --etd-after)"
    return out


def _run_method(m, model, run, task, retain, forget_ids, anchor, weight, lams, original, critical, *, epochs, lr,
                batch_size, seed, ascent_lr, ascent_epochs, retrain_epochs, precision="fp32", optimizer="sgd") -> dict:
    """Apply unlearning method ``m`` to ``model`` (a copy); returns ``{"model": ..., "mask": context or None}``."""
    from ..analyses.retrain import retrain_layer
    mask, data = None, task.data
    tune = partial(finetune, batch_size=batch_size, seed=seed, precision=precision, task=task, optimizer=optimizer)
    if m == "finetune":
        tune(model, retain, epochs=epochs, lr=lr)
    elif m == "ascent":
        tune(model, task.train.subset(forget_ids), epochs=ascent_epochs, lr=ascent_lr, ascent=True)
    elif m in ("ewc", "mas"):
        tune(model, retain, epochs=epochs, lr=lr, extra=penalty_term(anchor, weight, lams[m]))
    elif m == "lwf":
        tune(model, retain, epochs=epochs, lr=lr, extra=distillation_term(original, lams["lwf"], task=task))
    elif m == "zero":
        mask, _ = _zero_context(run, model, data, forget_ids)
    elif m == "etd_drop":
        from ..core.dropout import set_mode
        set_mode(model, "drop")
    else:
        # retrain_layer trains on the task's clean examples: here the retain set
        retain_data = with_targets(data, np.isin(np.arange(len(task.is_noisy)), forget_ids))
        _, model = retrain_layer(model, run.checkpoint(0), critical, retain_data,
                                 epochs=retrain_epochs, seed=seed, precision=precision)
    return {"model": model, "mask": mask}


@renamed(run="source")
@stored('unlearn')
def unlearn(source, *, forget: str = "noisy", methods=None, seeds=(0, 1, 2), epochs: int | None = None,
            lr: float | None = None, lam: dict | float | None = None, batch_size: int = HYPER["batch_size"],
            retrain_epochs: int = 20, ascent_lr: float | None = None, ascent_epochs: int = HYPER["ascent_epochs"],
            optimizer: str | None = None, device="auto", precision: str = "fp32") -> Result:
    """The ``"unlearn"`` result: accuracy (technique, seed, group), seconds, passes, the forget ids.
    ``precision``: every forward pass (evaluations, importance, fine-tuning, the retrained layer's) under
    autocast, fp16 training steps with a scaled loss (:mod:`memloc.core.precision`). ``optimizer`` / ``lr`` /
    ``ascent_lr`` / ``epochs`` unset: the module docstring's defaults (a language model's run: its own optimiser and lr)."""
    from .children import check_seeds
    from ..core.units import trace
    run = as_run(source)
    names = available_methods(run) if methods in (None, "all") else check_choices("methods", methods, METHODS,
                                                                                  "unlearning method")
    has_etd = bool(run.info.get("model", {}).get("etd"))
    if "etd_drop" in names and not has_etd:
        raise MemlocError(f"methods: etd_drop needs a run trained with example-tied dropout (train --etd-after); "
                          f"{str(run.path)!r} has none", argument="methods")
    seeds = check_seeds(seeds)
    batch_size = check_range("batch_size", batch_size, low=1, integer=True)
    opt = optimiser_settings(run, optimizer, None if lr is None else check_range("lr", lr, low=0, low_open=True),
                             None if ascent_lr is None else check_range("ascent_lr", ascent_lr, low=0, low_open=True),
                             None if epochs is None else check_range("epochs", epochs, low=1, integer=True), sgd=HYPER)
    optimizer, lr, ascent_lr, epochs = opt["optimizer"], opt["lr"], opt["ascent_lr"], opt["epochs"]
    ascent_epochs = check_range("ascent_epochs", ascent_epochs, low=1, integer=True)
    retrain_epochs = check_range("retrain_epochs", retrain_epochs, low=1, integer=True)
    check_precision(precision)
    lams = dict(HYPER["lam"])
    if isinstance(lam, dict):
        unknown = sorted(set(map(str, lam)) - set(lams))
        if unknown:
            raise MemlocError(f"lam has no method {unknown[0]!r}; its keys: {', '.join(lams)}", argument="lam")
        lams.update(lam)
    elif lam is not None:
        lam = check_range("lam", lam, low=0)
        lams = {k: float(lam) for k in lams}
    lams = {k: check_range("lam", v, low=0) for k, v in lams.items()}
    dev = resolve_device(device)
    check_precision(precision, dev)
    data = run.data(dev)
    flagged = (needed_result(run, "issues", "forget: flagged", argument="forget")["flagged"].values
               if forget == "flagged" else None)
    task = task_of(data)
    forget_ids = select_rows(data, str(forget), flagged=flagged, argument="forget")
    if not len(forget_ids):
        raise MemlocError(f"forget {forget!r} is an empty set of examples", argument="forget")
    n = len(task.is_noisy)
    retain_ids = np.setdiff1d(np.arange(n), forget_ids)
    if not len(retain_ids):
        raise MemlocError(f"forget {forget!r} holds every training example; nothing to retain",
                          argument="forget")
    retain = task.train.subset(retain_ids)
    original = laid_out(run.model(device=dev), precision, dev)      # its copies keep the layout
    if has_etd:          # dropout layers scale memorisation units by p_mem, also while fine-tuning (no ids needed)
        from ..core.dropout import set_mode
        set_mode(original, "test")
    anchor = {k: p.detach().clone() for k, p in original.named_parameters()}
    baseline = _groups(task, original, forget_ids, retain_ids, precision=precision)
    structure = trace(original, example_input(data))
    if "zero" in names:          # before any method runs: a missing input fails first, nothing computed
        _zero_context(run, original, data, forget_ids)
    critical, why = critical_layer(run, structure) if "retrain_layer" in names else (None, None)
    acc = np.zeros((len(names), len(seeds), len(task.groups)))
    seconds = np.zeros((len(names), len(seeds)))
    passes = np.zeros(len(names))
    fine = len(retain_ids) / n * epochs
    for i, m in enumerate(progress(names, desc="unlearn", unit="method")):
        weight = None
        if m in ("ewc", "mas"):       # importance of the retain set at theta*, computed once per method
            t0 = time.perf_counter()
            weight = protection_weights(original, retain, m, precision=precision, task=task)
            setup = time.perf_counter() - t0
        else:
            setup = 0.0
        for j, s in enumerate(seeds):
            t0 = time.perf_counter()
            model, ctx = copy.deepcopy(original), None
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(s)
                ctx = _run_method(m, model, run, task, retain, forget_ids, anchor, weight, lams, original, critical,
                                  epochs=epochs, lr=lr, batch_size=batch_size, seed=s, ascent_lr=ascent_lr,
                                  ascent_epochs=ascent_epochs, retrain_epochs=retrain_epochs, precision=precision,
                                  optimizer=optimizer)
                model = ctx.pop("model")
            seconds[i, j] = time.perf_counter() - t0 + setup
            acc[i, j] = _groups(task, model, forget_ids, retain_ids, mask_context=ctx.get("mask"), precision=precision)
        passes[i] = {"finetune": fine, "ascent": len(forget_ids) / n * ascent_epochs, "ewc": fine + len(retain_ids) / n,
                     "mas": fine + len(retain_ids) / n, "lwf": fine * 1.5, "zero": 0.0, "etd_drop": 0.0,
                     "retrain_layer": len(retain_ids) / n * retrain_epochs}[m]
    ds = xr.Dataset({"accuracy": (("technique", "seed", "group"), acc), "baseline": ("group", baseline),
                     "seconds": (("technique", "seed"), seconds), "passes": ("technique", passes),
                     "forget": ("forget", forget_ids)},
                    coords={"technique": names, "seed": seeds, "group": list(task.groups)})
    config = {"forget": forget, "methods": names, "seeds": seeds, "lam": lams, **opt,
              "ascent_epochs": ascent_epochs,
              "batch_size": batch_size, "retrain_epochs": retrain_epochs, "device": str(dev),
              "precision": precision}
    if critical is not None:        # the layer retrain_layer retrained, and why (a fallback is said, not silent)
        config["retrain_layer"] = {"layer": critical.name, "chosen_by": why}
    if methods in (None, "all"):    # the methods "all" left out for want of their input, and why
        config["skipped"] = {m: why for m, why in unavailable_methods(run).items()}
    return Result("unlearn", ds, config=config)


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--forget", default="noisy",
                   help="examples to forget: noisy (ground truth), flagged (memloc issues' flags: no ground truth), "
                        "class:C or ids:1,2,3")
    p.add_argument("--method", dest="methods", default="all",
                   help=f"comma-separated methods, or all (every method whose inputs exist: zero needs a flip result, "
                        f"etd_drop a run with example-tied dropout): {', '.join(METHODS)}")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"fine-tuning epochs over the retain set (default {HYPER['epochs']}; a language model's run at its "
                        f"own optimiser: {LM_EPOCHS})")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                   help="optimiser of fine-tuning and ascent: sgd (momentum 0.9) or adam (AdamW, no weight decay); default "
                        "sgd, but a language model's run's own training optimiser (AdamW) with its lr")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"fine-tuning learning rate (default {HYPER['lr']} with sgd; a language model's run at its own "
                        "optimiser: the run's training lr)")
    p.add_argument("--ascent-lr", type=positive_float, default=None,
                   help=f"gradient ascent's learning rate (default {HYPER['ascent_lr']} with sgd; a language model's run "
                        f"at its own optimiser: {LM_ASCENT:g}x the run's training lr); the result records the rates used")
    p.add_argument("--lambda", dest="lam", type=nonnegative_float, default=None,
                   help=f"penalty weight of ewc / mas and distillation weight of lwf (default {HYPER['lam']})")
    p.add_argument("--retrain-epochs", type=positive_int, default=20, help="epochs of retrain_layer")
    p.add_argument("--seeds", type=number(int, 0, 2**32 - 1), nargs="+", default=[0, 1, 2],
                   help="seeds of the batch order (mean and standard error over them)")
    add_precision(p, what=TRAINING_PASSES)


def _cli_execute(args):
    return unlearn(args.run, forget=args.forget, methods=args.methods, seeds=args.seeds, epochs=args.epochs, lr=args.lr,
                   lam=args.lam, retrain_epochs=args.retrain_epochs, ascent_lr=args.ascent_lr, optimizer=args.optimizer,
                   device=args.device, precision=args.precision)


def _cli_summary(res, args):
    groups = [str(g) for g in res["group"].values]
    c = res.config
    lines = [f"forget set: {res.sizes['forget']} examples ({c['forget']}); {c.get('optimizer', 'sgd')}, lr {c['lr']:g}, "
             f"ascent lr {c['ascent_lr']:g} ({c.get('defaults', 'given')}); accuracy (mean +- s.e. over "
             f"{res.sizes['seed']} seed(s)):",
             f"{'method':<14}" + "".join(f"{g:>22}" for g in groups) + f"{'seconds':>10}",
             f"{'(trained)':<14}" + "".join(f"{v:>22.4f}" for v in res["baseline"].values)]
    for m in res["technique"].values:
        r = res.sel(technique=m)
        lines.append(f"{str(m):<14}" + "".join(f"{mean_se(r['accuracy'].sel(group=g).values):>22}" for g in groups)
                     + f"{float(r['seconds'].mean()):>10.1f}")
    return "\n".join(lines + _layer_note(res))


ANALYSIS = Analysis(
    name="unlearn", order=130, compute=unlearn,
    plot=plot_unlearn,
    schema=Schema("unlearn", "memorised labels removed from the trained model, per method (memloc.unlearn)",
                  {"technique": Var(("technique",), "unlearning method"), "seed": Var(("seed",), "seed (batch order)"),
                   "group": Var(("group",), "forget_given (memorisation left), forget_true, retain, test; a language model's "
                                              "also test_rule (held-out suffixes reproduced)")},
                  {"accuracy": Var(("technique", "seed", "group"), "accuracy after unlearning"),
                   "baseline": Var(("group",), "accuracy of the trained model"),
                   "seconds": Var(("technique", "seed"), "wall time of the method"),
                   "passes": Var(("technique",), "passes over the training data (forward+backward epochs, importance passes included)"),
                   "forget": Var(("forget",), "ids of the forget set")}),
    command=Command(name="unlearn", group="acting", example="memloc unlearn RUN --forget flagged",
                    help='remove memorised labels: fine-tuning, ascent, EWC / MAS / LwF, unit zeroing, layer retraining',
                    description="Remove memorised labels from the final model without retraining from scratch: fine-tuning on the "
                                "retain set, gradient ascent on the forget set, fine-tuning protected by EWC / MAS penalties or LwF "
                                "distillation, zeroing the forget set's flip units, retraining the most critical layer. Accuracy on the "
                                "forget set (given labels: memorisation left; true labels), retain set and test, with the cost. Writes "
                                "RUN/results/unlearn.h5.",
                    flags={"lam": "--lambda"},
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
