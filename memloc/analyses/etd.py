"""The example-tied dropout analysis: a run (or model) with dropout layers evaluated in each mode.

``memloc.evaluate_dropout(run_or_model, data=None, *, checkpoint=None, recalibrate_bn=False)``
(command: ``python -m memloc dropout RUN``). The dropout layers themselves live in
:mod:`memloc.dropout`.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..core.dropout import EVAL_MODES, evaluate_modes, evaluate_sequence_modes, require_dropout_layers
from ..core.evaluate import SUBSETS
from ..core.schemas import LM_SUBSETS
from ..core.sequences import SequenceSet
from ..core.precision import apply_channels_last, autocast, check_precision
from ..core.results import Result
from ..core.runtime import check_choices, check_flag, check_range
from ..core.selection import resolve
from ..core.options import add_eval_batch_size, add_precision, nonnegative_int
from ..core.figures import figure, plt, LABELS, save_figure, table, coord_names
from ..core.schemas import Schema, Var, SUBSET_VAR
from ..core.registry import Analysis, Command
from ..core.store import stored

__all__ = ["evaluate_dropout"]


@stored('dropout')
def evaluate_dropout(source, data=None, *, checkpoint: int | None = None, modes=EVAL_MODES,
                     eval_batch_size: int = 1024, recalibrate_bn: bool = False, device="auto",
                     precision: str = "fp32") -> Result:
    """:func:`evaluate_modes` of a run trained with dropout layers (or of such a model with ``data``).

    ``checkpoint``: the run's epoch (default final). ``precision``: every forward pass (the BatchNorm
    recalibration's too) under autocast (:mod:`memloc.core.precision`). Returns the ``"dropout"`` result:
    ``accuracy`` (mode, subset) and per-layer ``layer_kind``, ``units``, ``gen_units``. A language
    model's run trained with sinks (``etd_after="mlp"``): the subsets are
    :data:`memloc.core.schemas.LM_SUBSETS` (memorised share of clean sequences and of the targets,
    suffix token accuracy of clean and held-out sequences, held-out rule accuracy), train mode passing
    each training sequence through its own sinks (:func:`memloc.core.dropout.evaluate_sequence_modes`).
    """
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    check_precision(precision)
    recalibrate_bn = check_flag("recalibrate_bn", recalibrate_bn)
    modes = check_choices("modes", modes, EVAL_MODES, "dropout mode")
    src = resolve(source, data, device=device, checkpoint=checkpoint)
    apply_channels_last(src.model, check_precision(precision, src.device), src.device)
    spec = src.run.info.get("model", {}).get("etd", {}) if src.run is not None else {}
    layers = require_dropout_layers(src.model)
    subsets = LM_SUBSETS if isinstance(src.data, SequenceSet) else SUBSETS
    if subsets is LM_SUBSETS:     # a language model's sinks: memorised shares and held-out accuracies per mode
        acc = evaluate_sequence_modes(src.model, src.data, modes=modes, batch_size=eval_batch_size,
                                      precision=precision)
    else:
        with autocast(precision, src.device):
            acc = evaluate_modes(src.model, src.data, modes=modes, batch_size=eval_batch_size,
                                 recalibrate_bn=recalibrate_bn)
    ds = xr.Dataset({"accuracy": (("mode", "subset"), acc),
                     "layer_kind": (("layer",), [l.kind for l in layers.values()]),
                     "units": (("layer",), np.array([l.units_seen or 0 for l in layers.values()], dtype=np.int64)),
                     "gen_units": (("layer",), np.array([l.n_gen(l.units_seen or 0) for l in layers.values()],
                                                        dtype=np.int64))},
                    coords={"mode": list(modes), "subset": list(subsets), "layer": list(layers)})
    config = {"checkpoint": src.checkpoint, "eval_batch_size": eval_batch_size, "recalibrate_bn": recalibrate_bn,
              "etd": spec, "device": str(src.device),
              "precision": precision}
    return Result("dropout", ds, config=config)


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--checkpoint", type=nonnegative_int, default=None,
                   help="checkpoint epoch to evaluate (default: final)")
    add_eval_batch_size(p)
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="before evaluating test and drop mode, re-estimate the BatchNorm running statistics "
                        "in that mode from the training inputs (training collected them under the "
                        "per-example masks; recommended for models with BatchNorm, e.g. resnet9)")
    add_precision(p, what="every forward pass")


def _cli_execute(args):
    return evaluate_dropout(args.run, checkpoint=args.checkpoint, eval_batch_size=args.eval_batch_size,
                            recalibrate_bn=args.recalibrate_bn, device=args.device,
                            precision=args.precision)


def _cli_summary(res, args):
    subsets = list(res["subset"].values)
    lines = [f"{args.run} (checkpoint {res.config['checkpoint']}; {res.sizes['layer']} dropout layers: "
             f"{', '.join(res['layer'].values)})", f"{'mode':<6}" + "".join(f"{s:>14}" for s in subsets)]
    for mode, row in zip(res["mode"].values, res["accuracy"].values):
        lines.append(f"{mode:<6}" + "".join(f"{'-':>14}" if np.isnan(v) else f"{100 * v:>13.2f}%" for v in row))
    return "\n".join(lines)


def plot_dropout(res, out, run=None) -> str:
    """Example-tied dropout: accuracy per subset in test mode vs drop mode (bar chart and table)."""
    acc, modes, subsets = res["accuracy"].values, coord_names(res, "mode"), coord_names(res, "subset")
    layers = coord_names(res)
    recalibrated = res.config.get("recalibrate_bn", False)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    x = np.arange(len(subsets))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        ax.bar(x + (i - (len(modes) - 1) / 2) * width, 100 * acc[i], width, label=f"{mode} mode")
    ax.set_xticks(x, [LABELS.get(s, s) for s in subsets], fontsize=8)
    ax.set(ylabel="accuracy (%)", ylim=(0, 101), title="example-tied dropout: before / after dropping")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(modes))
    name = save_figure(fig, out, "dropout.png")
    rows = [[f"{m} mode"] + [100 * float(v) for v in acc[i]] for i, m in enumerate(modes)]
    return ("## Example-tied dropout\n\nMemorisation units are scaled by p_mem in test mode and dropped in drop "
            f"mode (dropout layers after: {', '.join(layers)})"
            + ("; BatchNorm statistics were re-estimated in test and drop mode (recalibrate_bn)" if recalibrated else "")
            + ".\n\n"
            + figure("dropout", name, "accuracy per subset in each mode: train mode uses each example's own mask "
                     "(training examples only), test mode scales the memorisation units by p_mem, drop mode zeroes "
                     "them. The noisy bar falling from train to drop mode is memorisation removed; the test bars "
                     "show what it costs.") + "\n\n"
            + table(["model"] + [LABELS.get(s, s) for s in subsets], rows, digits=1))


ANALYSIS = Analysis(
    name="dropout", order=150, compute=evaluate_dropout,
    plot=plot_dropout,
    schema=Schema("dropout", "example-tied dropout evaluated per mode (memloc.dropout)",
                  {"mode": Var(("mode",), "train, test, drop"), **SUBSET_VAR,
                   "layer": Var(("layer",), "module the dropout layer follows")},
                  {"accuracy": Var(("mode", "subset"), "accuracy with every dropout layer in the mode (train: test is NaN)"),
                   "layer_kind": Var(("layer",), "example_tied | standard | fixed"),
                   "units": Var(("layer",), "units of the layer"),
                   "gen_units": Var(("layer",), "generalisation units (always kept)")}),
    command=Command(name="dropout", group="localisation", example="memloc dropout RUN",
                    help='evaluate an example-tied-dropout run in train, test and drop mode',
                    description="Evaluate a run trained with example-tied dropout (--etd-after) in train mode (each training example "
                                "through its own mask: what was memorised), test mode (memorisation units scaled by p_mem) and drop "
                                "mode (memorisation units zeroed, generalisation units rescaled): accuracy on clean training "
                                "examples, noisy ones (given and true labels) and the test set. Writes RUN/results/dropout.h5.",
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
