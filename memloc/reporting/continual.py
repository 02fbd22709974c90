"""Report sections of the continual-learning results: importance maps and unlearning."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.run import Run
from .plots import plt, save_figure, table

__all__ = ["CONTINUAL_PLOTTERS", "draw_pareto", "plot_importance", "plot_unlearn", "plot_forgetting"]


def plot_importance(res, out: Path, run: Run | None = None) -> str:
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
            f"gradients of the squared output norm).\n\n![importance]({name})")
    if "flip_overlap" in res:
        text += (f"\n\nOverlap (Jaccard) of the {res.sizes['zeroed']} units flip zeroed for noisy examples with as "
                 f"many top units by noisy importance: {float(res['flip_overlap']):.3f}.")
    return text


def draw_pareto(ax, res, title: str) -> None:
    """Memorisation removed (1 - forget_given) vs test accuracy per method of an ``"unlearn"`` result,
    mean +- std over seeds, with the trained model's test accuracy as a dashed line."""
    for m in res["technique"].values:
        r = res["accuracy"].sel(technique=m)
        removed, test = 100 * (1 - r.sel(group="forget_given").values), 100 * r.sel(group="test").values
        ax.errorbar(removed.mean(), test.mean(), xerr=removed.std(), yerr=test.std(), fmt="o", capsize=3,
                    label=str(m))
    ax.axhline(100 * float(res["baseline"].sel(group="test")), color="gray", ls="--", lw=1, label="trained model")
    ax.set(xlabel="memorised labels removed (%)", ylabel="test accuracy (%)", xlim=(-3, 103), title=title)


def plot_unlearn(res, out: Path, run: Run | None = None) -> str:
    """Memorisation removed vs test accuracy per method (Pareto view), and the table."""
    methods, groups = [str(m) for m in res["technique"].values], [str(g) for g in res["group"].values]
    acc = res["accuracy"].values                       # (method, seed, group)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    draw_pareto(ax, res, f"unlearning: forget = {res.config.get('forget')}")
    ax.legend(fontsize=7)
    name = save_figure(fig, out, "unlearn.png")
    rows = [["(trained)"] + [100 * float(v) for v in res["baseline"].values] + ["-"]]
    rows += [[m] + [100 * float(v) for v in acc[i].mean(0)] + [f"{float(res['seconds'].values[i].mean()):.1f}"]
             for i, m in enumerate(methods)]
    return (f"## Unlearning memorised labels\n\nForget set: {res.sizes['forget']} examples "
            f"({res.config.get('forget')}); accuracy (%) mean over {res.sizes['seed']} seed(s).\n\n![unlearn]({name})\n\n"
            + table(["method", *groups, "seconds"], rows, digits=1))


def plot_forgetting(res, out: Path, run: Run | None = None) -> str:
    """Accuracy on both parts over the two phases, one panel per order, one colour per protection."""
    orders, protect = [str(o) for o in res["order"].values], [str(p) for p in res["protect"].values]
    e = res.sizes["epoch"] // 2
    fig, axes = plt.subplots(1, len(orders), figsize=(4.4 * len(orders), 3.4), squeeze=False, sharey=True)
    for ax, o in zip(axes[0], orders):
        for k, p in enumerate(protect):
            a = res["accuracy"].sel(order=o, protect=p)
            ax.plot(res["epoch"].values, 100 * a.sel(part="first").values, color=f"C{k}", label=f"first part, {p}")
            ax.plot(res["epoch"].values, 100 * a.sel(part="second").values, color=f"C{k}", ls=":")
        ax.axvline(e, color="gray", lw=1)
        ax.set(xlabel="epoch (phase 1 | phase 2)", title=o)
    axes[0, 0].set_ylabel("accuracy (%) (solid: first part, dotted: second)")
    axes[0, -1].legend(fontsize=7, loc="lower left")
    name = save_figure(fig, out, "forgetting.png")
    rows = [[o, p, 100 * float(res["accuracy"].sel(order=o, protect=p, epoch=e, part="first")),
             100 * float(res["accuracy"].sel(order=o, protect=p, epoch=2 * e, part="first")),
             100 * float(res["accuracy"].sel(order=o, protect=p, epoch=2 * e, part="second"))]
            for o in orders for p in protect]
    return ("## Within-task forgetting\n\nA fresh model trained on the first part, then on the second (Toneva et al. "
            f"2019, section 5).\n\n![forgetting]({name})\n\n"
            + table(["order", "protection", "first, end of phase 1", "first, end", "second, end"], rows, digits=1))


CONTINUAL_PLOTTERS = {"importance": plot_importance, "unlearn": plot_unlearn, "forgetting": plot_forgetting}
