"""The report section of :func:`memloc.unlearn`: memorisation removed vs test accuracy (a Pareto view)."""
from __future__ import annotations

from ..core.figures import figure, plt, save_figure, table

__all__ = ["draw_pareto", "plot_unlearn"]

def _layer_note(res) -> list[str]:
    chosen, skipped = res.config.get("retrain_layer"), res.config.get("skipped") or {}
    return ([f"retrain_layer retrained {chosen['layer']!r}: {chosen['chosen_by']}"] if chosen else []) + \
        [f"{m} skipped: {why}" for m, why in skipped.items()]


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


def plot_unlearn(res, out, run=None) -> str:
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
            f"({res.config.get('forget')}); accuracy (%) mean over {res.sizes['seed']} seed(s)."
            + "".join(f" {line}." for line in _layer_note(res)) + "\n\n"
            + figure("unlearn", name, "one point per method: further right, more of the memorised labels removed; "
                     "higher, better test accuracy (the dashed line is the trained model's). The best methods sit at "
                     "the top right" + (f"; error bars are standard deviations over the {res.sizes['seed']} seeds."
                                        if res.sizes["seed"] > 1 else " (one seed: no error bars).")) + "\n\n"
            + table(["method", *groups, "seconds"], rows, digits=1))
