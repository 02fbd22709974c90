"""Parameter importance maps from continual learning: which parameters matter for which examples?

``memloc.importance(run_or_model, data=None, *, method="fisher"|"mas", subsets=("clean", "noisy"))``
(command: ``python -m memloc importance RUN``):

* ``fisher`` (EWC, Kirkpatrick et al. 2017): the diagonal empirical Fisher information, the mean
  over the examples of the squared per-example gradient of the cross-entropy of the *given* label;
* ``mas`` (Aljundi et al. 2018): Omega, the mean over the examples of the absolute per-example
  gradient of the squared L2 norm of the output (logits); needs no labels.

Both in eval mode (BatchNorm uses its running statistics, so examples do not interact), with
per-example gradients from ``torch.func`` (``vmap`` of ``grad``) in batches. Aggregated per
layer (sum over the layer's parameters / their count, :func:`memloc.core.units.trace` layers) and per
unit (conv channel / linear feature, the unit ids of :mod:`memloc.flip`: the parameters that
produce that unit -- its weight row or filter, bias, and its norm's scale and shift -- averaged).
With a flip result, ``flip_overlap`` is the Jaccard overlap between the units flip zeroed for the
noisy examples and the same number of top units by the noisy subset's importance.

On a language model's run (:mod:`memloc.core.tasks`) the memorisation targets are the noisy subset and
the other training sequences the clean one; ``fisher`` squares the per-sequence gradient of the
suffix's log-likelihood (teacher-forced, summed over the suffix tokens), ``mas`` takes the gradient of
the squared norm of the logits at the positions that predict the suffix; the layers and units are
:func:`memloc.core.units.trace`'s (embeddings, each block's projections and norms; units: the output
features of its linear maps).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
import xarray as xr

from ..core.deprecation import renamed
from ..core.errors import MemlocError
from ..core.evaluate import eval_mode
from ..core.precision import apply_channels_last, autocast, check_precision
from ..core.results import Result
from ..core.runtime import check_range, progress
from ..core.selection import layer_coords, resolve
from ..core.units import CONV_TYPES, Structure, trace
from ..core.options import add_precision, layer_table, positive_int
from ..core.figures import figure, plt, save_figure
from ..core.schemas import Schema, Var, layer_vars
from ..core.registry import Analysis, Command
from ..core.prerequisites import command_line, needed_result
from ..core.store import stored
from ..core.tasks import ClassifierTask, example_input, select_rows, split_subsets, task_of  # noqa: F401 (select_rows: its old home)

__all__ = ["METHODS", "param_importance", "unit_importance", "layer_importance", "importance", "select_rows", "flip_units"]

METHODS = ("fisher", "mas")


class _Outputs(nn.Module):
    """``model`` behind ``task.outputs`` (so that ``functional_call`` runs what the task's loss is taken of)."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x):
        return self.task.outputs(self.model, x)


def _example_loss(method: str, task):
    def loss(params, buffers, model, x, y):
        out = functional_call(model, (params, buffers), (x[None],))
        return task.importance_loss(out, x[None], y[None], method)
    return loss


def param_importance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str = "fisher",
                     batch_size: int = 128, precision: str = "fp32", task=None) -> dict[str, torch.Tensor]:
    """Per-parameter importance (same shapes as the trainable parameters) over the examples ``x``.

    ``fisher``: mean_i (d CE(f(x_i), y_i) / d theta)^2; ``mas``: mean_i |d ||f(x_i)||^2 / d theta|.
    ``task``: a :mod:`memloc.core.tasks` piece (default a classifier's); a language model's
    (:class:`memloc.core.tasks.SequenceTask`, ``x`` token rows, ``y`` their ids) takes the suffix's
    negative log-likelihood for CE and the suffix positions' logits for f.
    The model is evaluated in eval mode; its weights and train flags are left as they were.
    ``precision``: the forward passes (and so the gradients' products) under autocast
    (:mod:`memloc.core.precision`); the importance sums stay float32.
    """
    if method not in METHODS:
        raise MemlocError(f"unknown importance method {method!r}; valid: {', '.join(METHODS)}", argument="method")
    batch_size = check_range("batch_size", batch_size, low=1, integer=True)
    check_precision(precision, x.device)
    if len(y) == 0:
        raise MemlocError("importance needs at least one example", argument="subsets")
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    task = ClassifierTask if task is None else task
    classifier = task is ClassifierTask or isinstance(task, ClassifierTask)
    with eval_mode(model), autocast(precision, x.device):
        total = _linear_importance(model, params, x, y, method, batch_size) if classifier else None
        if total is None:
            total = _vmap_importance(model, params, x, y, method, batch_size, task)
    return {k: v / len(y) for k, v in total.items()}


def _batches(n: int, batch_size: int, method: str):
    return progress(range(0, n, batch_size), desc=f"importance ({method})", unit="batch")


def _vmap_importance(model, params, x, y, method, batch_size, task=ClassifierTask) -> dict[str, torch.Tensor]:
    """Sums over the examples of squared (fisher) / absolute (mas) per-example gradients, from
    ``torch.func`` (any model; the per-example gradients of a batch are held at once). It runs on a
    copy: torch.func.functional_call leaves a layer used twice (tied weights) detached from its parameters."""
    import copy
    import warnings
    if _shares_parameters(model):
        model = copy.deepcopy(model)
    wrapped = _Outputs(model, task)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    params = {f"model.{k}": p for k, p in params.items()}
    buffers = {f"model.{k}": b.detach() for k, b in model.named_buffers()}
    per_example = vmap(grad(_example_loss(method, task)), in_dims=(None, None, None, 0, 0))
    hooks = _norm_inputs_cast(model) if torch.is_autocast_enabled(x.device.type) else []
    try:
        with warnings.catch_warnings():   # attention has no vmap batching rule (torch warns; same result)
            warnings.filterwarnings("ignore", message="There is a performance drop")
            for s in _batches(len(y), batch_size, method):
                g = per_example(params, buffers, wrapped, x[s:s + batch_size], y[s:s + batch_size])
                for k in total:
                    gk = g[f"model.{k}"].to(total[k].dtype)   # 16-bit under autocast: sums in the parameter's type
                    total[k] += (gk.pow(2) if method == "fisher" else gk.abs()).sum(0)
    finally:
        for h in hooks:
            h.remove()
    return total


def _norm_inputs_cast(model) -> list:
    """Hooks casting each batch norm's input to its statistics' type: under vmap, autocast hands batch_norm
    a 16-bit input beside float32 statistics, which its batching rule refuses (the norm then runs in float32,
    the next matrix product in 16 bits again)."""
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            dtype = next((t.dtype for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()), torch.float32)
            hooks.append(m.register_forward_pre_hook(lambda mod, args, d=dtype: (args[0].to(d), *args[1:])))
    return hooks


def _shares_parameters(model) -> bool:
    """Is one parameter reachable under two names (a layer used twice, or tied weights)?"""
    return len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.named_parameters()))


def _linear_importance(model, params, x, y, method, batch_size) -> dict[str, torch.Tensor] | None:
    """The sums of :func:`_vmap_importance` without per-example gradients, for models whose trainable
    parameters all belong to ``nn.Linear`` layers applied once to (B, in) rows: example i's gradient of
    a weight is the outer product g_i a_i^T of its output gradient and input, so its square (absolute
    value) summed over i is (g^2)^T (a^2) (|g|^T |a|), and its bias's g_i^2 (|g_i|) summed. None where
    that does not hold: another layer (a subclass of Linear included) holds a parameter, a parameter is
    shared, a layer is reused, sees other rows than the batch's examples (B*T, in) or its output is
    changed in place afterwards (``ReLU(inplace=True)``)."""
    owners = {(f"{name}." if name else "") + pname: (name, mod) for name, mod in model.named_modules()
              for pname, _ in mod.named_parameters(recurse=False)}
    if not params or _shares_parameters(model) or not all(type(owners[k][1]) is nn.Linear for k in params):
        return None
    layers = {owners[k][0]: owners[k][1] for k in params}
    seen: dict[str, list] = {name: [] for name in layers}

    def keep(name):
        return lambda mod, inputs, out: seen[name].append((inputs[0].detach(), out, out._version))

    total = {k: torch.zeros_like(p) for k, p in params.items()}
    square = (lambda t: t.pow(2)) if method == "fisher" else torch.abs
    handles = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    try:
        for s in _batches(len(y), batch_size, method):
            for v in seen.values():
                v.clear()
            with torch.enable_grad():
                out = model(x[s:s + batch_size])
                rows = len(y[s:s + batch_size])
                if any(len(v) != 1 or v[0][0].ndim != 2 or v[0][0].shape[0] != rows or v[0][1].shape[0] != rows
                       or v[0][1]._version != v[0][2] for v in seen.values()):
                    return None
                loss = F.cross_entropy(out, y[s:s + batch_size], reduction="sum") if method == "fisher" \
                    else out.pow(2).sum()
                names = list(seen)
                grads = torch.autograd.grad(loss, [seen[n][0][1] for n in names], allow_unused=True)
            for name, g in zip(names, grads):
                if g is None:       # a layer the loss does not use: no gradient
                    continue
                dtype = next(layers[name].parameters()).dtype     # 16-bit under autocast: the sums in the
                g, a = g.to(dtype), seen[name][0][0].to(dtype)     # parameters' type
                for pname, p in layers[name].named_parameters(recurse=False):
                    key = (f"{name}." if name else "") + pname
                    if key in total:
                        total[key] += square(g).T @ square(a) if pname == "weight" else square(g).sum(0)
    finally:
        for h in handles:
            h.remove()
    return total


def layer_importance(imp: dict[str, torch.Tensor], structure: Structure) -> np.ndarray:
    """(L,) mean importance per parameter of each traced layer."""
    out = []
    for layer in structure.layers:
        vals = [imp[k] for k in layer.params if k in imp]
        n = sum(v.numel() for v in vals)
        out.append(float(sum(v.sum() for v in vals) / n) if n else float("nan"))
    return np.asarray(out)


def _unit_params(model: nn.Module, structure: Structure) -> list[tuple[int, list[tuple[str, int]]]]:
    """(offset, [(parameter name, the dim that indexes the space's units)]) of every unit space."""
    modules = dict(model.named_modules())
    out = []
    for space in structure.spaces:
        names = []
        for mod in (space.module, space.norm):
            if mod is None:
                continue
            transposed = isinstance(modules[mod], CONV_TYPES[3:]) and modules[mod].groups == 1
            for pname, p in modules[mod].named_parameters(recurse=False):
                dim = 1 if transposed and pname == "weight" else 0     # ConvTranspose weight: (in, out, ...)
                if p.ndim > dim and p.shape[dim] == space.size:
                    names.append((f"{mod}.{pname}", dim))
        out.append((space.offset, names))
    return out


def unit_importance(imp: dict[str, torch.Tensor], model: nn.Module, structure: Structure) -> np.ndarray:
    """(n_units,) mean importance of the parameters producing each unit (weight row / filter, bias, norm)."""
    out = np.full(structure.n_units, np.nan)
    for space, (offset, names) in zip(structure.spaces, _unit_params(model, structure)):
        rows = [imp[n].movedim(d, 0).reshape(space.size, -1) for n, d in names if n in imp]
        if not rows:
            continue
        sums = sum(r.sum(1) for r in rows)
        counts = sum(r.shape[1] for r in rows)
        out[offset:offset + space.size] = (sums / counts).cpu().numpy()
    return out


def flip_units(run, examples=None) -> np.ndarray | None:
    """Global ids of every unit zeroed by a flip search that flipped, for the noisy examples (or the
    example ids ``examples``); None without a flip result. Searches that hit max_units unflipped are left out."""
    if run is None or not run.results_path("flip").is_file():
        return None
    res = run.result("flip")
    ids, off = res["unit_ids"].values, res["unit_offsets"].values
    repeats = res.sizes["repeat"]
    chosen = (res["is_noisy"].values.astype(bool) if examples is None
              else np.isin(res["example"].values, np.asarray(examples)))
    flipped = res["flipped"].values.astype(bool)
    rows = [i * repeats + r for i in np.flatnonzero(chosen & (res["status"].values == 0)) for r in range(repeats)
            if flipped[i, r]]
    return np.unique(np.concatenate([ids[off[r]:off[r + 1]] for r in rows])) if rows else np.zeros(0, np.int64)


@renamed(batch_size="eval_batch_size")
@stored('importance')
def importance(source, data=None, *, method: str = "fisher", subsets=("clean", "noisy"),
               eval_batch_size: int = 128, device="auto", precision: str = "fp32") -> Result:
    """The ``"importance"`` result: ``layer_importance`` (subset, layer), ``unit_importance`` (subset, unit).
    ``precision``: the gradient passes under autocast (:func:`param_importance`)."""
    check_precision(precision)
    src = resolve(source, data, device=device)
    apply_channels_last(src.model, check_precision(precision, src.device), src.device)
    names = split_subsets(subsets)
    if not names:
        raise MemlocError("give at least one subset", argument="subsets")
    flagged = None
    if "flagged" in names and src.run is not None:
        flagged = needed_result(src.run, "issues", "subsets: flagged", argument="subsets")["flagged"].values
    task = task_of(src.data)
    structure = trace(src.model, example_input(src.data))
    train = task.train
    per_layer, per_unit, sizes = [], [], []
    for name in names:
        rows = select_rows(src.data, name, flagged=flagged)
        part = train.subset(rows)        # a streamed set's rows are read batch by batch
        imp = param_importance(src.model, part.x, part.y, method=method, batch_size=eval_batch_size,
                               precision=precision, task=task)
        per_layer.append(layer_importance(imp, structure))
        per_unit.append(unit_importance(imp, src.model, structure))
        sizes.append(len(rows))
    coords = {**layer_coords(structure.layers), "subset": names, "unit": np.arange(structure.n_units),
              "unit_layer": ("unit", np.repeat([s.name for s in structure.spaces], [s.size for s in structure.spaces]))}
    variables = {"layer_importance": (("subset", "layer"), np.stack(per_layer)),
                 "unit_importance": (("subset", "unit"), np.stack(per_unit)),
                 "examples": ("subset", np.asarray(sizes))}
    flip_config = (src.run.result("flip").config if src.run is not None and src.run.results_path("flip").is_file()
                   else {})
    other_units = flip_config.get("site") == "weight" or flip_config.get("units", "outputs") != "outputs"
    zeroed = None if other_units else flip_units(src.run)   # parameter items / heads / MLP inputs: not these units
    if zeroed is not None and "noisy" in names and len(zeroed):
        top = np.argsort(-np.nan_to_num(per_unit[names.index("noisy")], nan=-np.inf), kind="stable")[:len(zeroed)]
        inter = len(np.intersect1d(top, zeroed))
        variables["flip_overlap"] = ((), inter / (2 * len(zeroed) - inter))
        variables["flip_units"] = ("zeroed", zeroed)
    config = {"method": method, "subsets": names, "batch_size": eval_batch_size, "device": str(src.device),
              "checkpoint": src.checkpoint, "precision": precision}
    if src.run is not None and "flip_overlap" not in variables:
        config["flip_overlap_missing"] = _why_no_overlap(src.run, names, weight_site, zeroed)
    return Result("importance", xr.Dataset(variables, coords=coords), config=config)


def _why_no_overlap(run, names, weight_site: bool, zeroed) -> str:
    """Why a run's importance has no ``flip_overlap`` and what to run to get it (said by summary and report)."""
    if zeroed is None and not weight_site and "noisy" in names:
        return (f"no results/flip.h5 in the run: run {command_line(run, 'flip')} first, then "
                f"{command_line(run, 'importance')[:-1]} --overwrite`")
    return ("the noisy subset was not asked for" if "noisy" not in names else
            "flip searched weights (site=weight), not units" if weight_site else "flip flipped no noisy example")


# The declaration: command line, report section and result schema (memloc.core.registry).

def _cli_arguments(p):
    p.add_argument("--method", default="fisher", choices=METHODS,
                   help="fisher: mean squared per-example gradient of the given label's loss; mas: mean absolute "
                        "per-example gradient of the squared output norm (no labels)")
    p.add_argument("--subsets", default="clean,noisy",
                   help="comma-separated example subsets: clean, noisy, all, flagged (memloc issues' flags), class:C; "
                        "or one ids:1,2,3 subset alone")
    p.add_argument("--batch-size", type=positive_int, default=128, help="examples per vectorised gradient pass")
    add_precision(p, what="the gradient passes")


def _cli_execute(args):
    return importance(args.run, method=args.method, subsets=args.subsets, eval_batch_size=args.batch_size, device=args.device,
                      precision=args.precision)


def _cli_summary(res, args):
    subsets = [str(s) for s in res["subset"].values]
    text = (f"{res.config['method']} importance (mean per parameter; examples: "
            + ", ".join(f"{s} {int(n)}" for s, n in zip(subsets, res["examples"].values)) + ")\n"
            + layer_table([str(n) for n in res["layer"].values], subsets, res["layer_importance"].values.T, "10.3g"))
    if "flip_overlap" in res:
        text += (f"\noverlap (Jaccard) of the {res.sizes['zeroed']} units flip zeroed for noisy examples with as many "
                 f"top noisy-importance units: {float(res['flip_overlap']):.3f}")
    elif res.config.get("flip_overlap_missing"):
        text += f"\nflip overlap not computed: {res.config['flip_overlap_missing']}"
    unit = res["unit_importance"].values
    if np.isfinite(unit).any() and len(subsets) > 1:
        ratio = np.nanmean(unit[1]) / np.nanmean(unit[0])
        text += f"\nmean unit importance {subsets[1]} / {subsets[0]}: {ratio:.2f}"
    return text


def plot_importance(res, out, run=None) -> str:
    """Mean importance per parameter of every layer, one bar per subset (log scale)."""
    layers, subsets = [str(n) for n in res["layer"].values], [str(s) for s in res["subset"].values]
    values = res["layer_importance"].values
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(layers) + 2), 3.2))
    x = np.arange(len(layers))
    width = 0.8 / len(subsets)
    colors = {"clean": "tab:blue", "noisy": "tab:red"}
    for i, s in enumerate(subsets):
        ax.bar(x + (i - (len(subsets) - 1) / 2) * width, values[i], width, label=s, color=colors.get(s))
    ax.set_xticks(x, layers, fontsize=8, rotation=30 if len(layers) > 6 else 0)
    ax.set(yscale="log", ylabel="importance per parameter", title=f"{res.config.get('method')} importance per layer")
    ax.legend(fontsize=8)
    name = save_figure(fig, out, "importance.png")
    text = (f"## Parameter importance ({res.config.get('method')})\n\nMean importance per parameter of each layer "
            "for each subset of training examples (Fisher: squared loss gradients, the EWC weight; MAS: absolute "
            "gradients of the squared output norm).\n\n"
            + figure("importance", name, "one group of bars per layer, one bar per subset of training examples "
                     "(log scale): where the noisy bar stands far above the clean one, the layer's weights matter "
                     "most to the memorised labels."))
    if "flip_overlap" in res:
        text += (f"\n\nOverlap (Jaccard) of the {res.sizes['zeroed']} units flip zeroed for noisy examples with as "
                 f"many top units by noisy importance: {float(res['flip_overlap']):.3f}.")
    elif res.config.get("flip_overlap_missing"):
        text += f"\n\nFlip overlap not computed: {res.config['flip_overlap_missing']}."
    return text


ANALYSIS = Analysis(
    name="importance", order=120, compute=importance,
    plot=plot_importance,
    schema=Schema("importance", "per-layer and per-unit parameter importance, Fisher (EWC) or MAS (memloc.importance)",
                  {**layer_vars(), "subset": Var(("subset",), "examples the importance is of: clean, noisy, all, flagged, class:C, ids:..."),
                   "unit": Var(("unit",), "global unit id (as in flip)"), "unit_layer": Var(("unit",), "the unit's layer")},
                  {"layer_importance": Var(("subset", "layer"), "mean importance per parameter of the layer"),
                   "unit_importance": Var(("subset", "unit"), "mean importance of the parameters producing the unit (NaN: the logits layer)"),
                   "examples": Var(("subset",), "examples in the subset"),
                   "flip_overlap": Var((), "Jaccard overlap of flip's zeroed units (noisy examples) and as many top noisy-importance units", optional=True),
                   "flip_units": Var(("zeroed",), "units flip zeroed for noisy examples", optional=True)}),
    command=Command(name="importance", group="localisation", example="memloc importance RUN",
                    help='Fisher (EWC) / MAS parameter importance per layer and unit, clean vs noisy',
                    description="Which parameters matter for which examples: the diagonal Fisher information (EWC) or MAS importance "
                                "of the final model on each subset of training examples, per layer (mean per parameter) and per unit "
                                "(the unit ids of flip); with a flip result, the overlap between the units flip zeroes for noisy "
                                "examples and the top units by noisy importance. Writes RUN/results/importance.h5.",
                    arguments=_cli_arguments,
                    summary=_cli_summary,
                    execute=_cli_execute),
)
