"""Report section of the ``mitigation`` result: every method's trade-off between the memorised targets it
removes and the held-out accuracy it keeps."""
from __future__ import annotations

import numpy as np

from ...core.figures import coord_names, figure, plt, save_figure, table

__all__ = ["plot_mitigation"]


def plot_mitigation(res, out, run=None) -> str:
    settings = coord_names(res, "setting")
    targets, acc = res["targets_memorised"].values, res["test_accuracy"].values
    t0, a0 = float(res["targets_memorised_before"]), float(res["test_accuracy_before"])
    rule = not np.isnan(res["rule_accuracy"].values).all()
    fig, ax = plt.subplots(figsize=(7, 4))
    methods = sorted({str(m) for m in res["method"].values})
    colors = dict(zip(methods, plt.cm.tab10(np.arange(len(methods)) % 10)))
    for i, s in enumerate(settings):
        ax.scatter(100 * targets[i], 100 * acc[i], color=colors[str(res["method"].values[i])], s=40, zorder=3)
        ax.annotate(s, (100 * targets[i], 100 * acc[i]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.scatter([100 * t0], [100 * a0], marker="*", s=160, color="black", zorder=4, label="before (the trained model)")
    ax.axhline(100 * a0 - 1, color="gray", ls=":", lw=1, label="1 point below")
    ax.set(xlabel="targets still reproduced (%)", ylabel="held-out suffix token accuracy (%)", xlim=(-3, 103),
           title="mitigation: targets removed against accuracy kept")
    ax.legend(fontsize=8, loc="lower right")
    name = save_figure(fig, out, "mitigation.png")
    header = ["setting", "targets (%)", "others (%)", "held-out token acc. (%)"] + (["rule acc. (%)"] if rule else []) \
        + ["seconds"]
    before = ["(before)", 100 * t0, 100 * float(res["others_memorised_before"]), 100 * a0] \
        + ([100 * float(res["rule_accuracy_before"])] if rule else []) + [float("nan")]
    rows = [before] + [[s, 100 * targets[i], 100 * float(res["others_memorised"].values[i]), 100 * acc[i]]
                       + ([100 * float(res["rule_accuracy"].values[i])] if rule else [])
                       + [float(res["seconds"].values[i])] for i, s in enumerate(settings)]
    return ("## Removing memorised sequences (mitigation)\n\nEach method edits a copy of the model so that it no "
            f"longer reproduces its {res.sizes['target']} memorised targets (`memloc mitigate`"
            + ("; the localisation methods and greedy zero attention heads" if res.config.get("units") == "heads" else "")
            + ").\n\n"
            + figure("mitigation", name, "one point per method (and fraction): the share of memorisation targets the "
                     "edited model still reproduces (left is better) against its held-out suffix token accuracy "
                     "(higher is better); the star is the model before, the dotted line one point below it. The best "
                     "methods sit top left.")
            + "\n\n" + table(header, rows, digits=1))
