"""One plotting function per result (:data:`PLOTTERS`): it draws from the result object (never
from raw file keys), writes its PNGs into the output folder and returns its Markdown section."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..analyses.detect import plot_curves  # noqa: E402
from ..core.run import Run  # noqa: E402
from ..core.runtime import atomic_path  # noqa: E402

__all__ = ["PLOTTERS", "plot_training", "table", "save_figure"]

COLORS = {"clean": "tab:blue", "noisy": "tab:red", "noisy_true": "tab:orange", "test": "tab:green",
          "total": "tab:gray"}
LABELS = {"clean": "clean train", "noisy": "noisy train (given label)",
          "noisy_true": "noisy train (true label)", "test": "test"}


def save_figure(fig, out: Path, name: str) -> str:
    try:
        fig.tight_layout()
        with atomic_path(out / name) as tmp:    # a killed report never leaves a half-written figure
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return name


def table(header: list[str], rows: list[list], digits: int = 3) -> str:
    """A Markdown table; floats with ``digits`` decimals, NaN as '-'."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "-" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _short(names) -> list[str]:
    """Layer names short enough for tick labels."""
    return [n if len(n) <= 18 else "…" + n[-17:] for n in names]


def plot_training(run: Run, out: Path) -> str:
    """Accuracy curves over epochs, and mean loss of clean vs noisy examples."""
    m = run.metrics()
    epochs = np.arange(len(m["test_accuracy"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("clean", "noisy", "noisy_true", "test"):
        a.plot(epochs, 100 * m[f"{key}_accuracy"], color=COLORS[key], label=LABELS[key])
    a.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy during training", ylim=(0, 101))
    a.legend(fontsize=8)
    loss = run.dynamics("loss", "end")
    for key, rows in (("clean", ~run.is_noisy), ("noisy", run.is_noisy)):
        if rows.any():
            b.plot(epochs, loss[:, rows].mean(1), color=COLORS[key], label=f"{key} examples")
    b.set(xlabel="epoch", ylabel="mean loss (given label)", title="loss at epoch end", yscale="log")
    b.legend(fontsize=8)
    name = save_figure(fig, out, "training.png")
    last = {k: float(v[-1]) for k, v in m.items()}
    rows = [[LABELS[k], 100 * last[f"{k}_accuracy"]] for k in ("clean", "noisy", "noisy_true", "test")]
    return ("## Training\n\n"
            f"{run.num_train} training examples, {int(run.is_noisy.sum())} with noisy labels; "
            f"{run.final_epoch} epochs.\n\n![training]({name})\n\n"
            + table(["final accuracy on", "%"], rows, digits=1))


def _names(res, coord: str = "layer") -> list[str]:
    return [str(n) for n in res[coord].values]


def _grid(n: int, width: float = 3.2, height: float = 2.6, **kw):
    """A figure with one small axis per layer (at most 4 per row); unused axes hidden."""
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kw)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def plot_gradients(res, out: Path, run: Run | None = None) -> str:
    """Per-layer gradient norms (clean / noisy / all) over epochs and the clean-noisy cosine heatmap."""
    layers, epochs = _names(res), res["checkpoint"].values
    q = {f"norm_{'total' if k == 'all' else k}": res["norm"].sel(subset=k).values for k in ("clean", "noisy", "all")}
    q["cosine"] = res["cosine"].values
    n = len(layers)
    fig, axes = _grid(n, sharex=True)
    for i, ax in enumerate(axes.flat[:n]):
        for key in ("clean", "noisy", "total"):
            ax.plot(epochs, q[f"norm_{key}"][:, i], color=COLORS[key], label=key)
        ax.set_yscale("log")
        ax.set_title(_short([layers[i]])[0], fontsize=9)
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("||grad|| / sqrt(#params)")
    axes[0, 0].legend(fontsize=7)
    norms = save_figure(fig, out, "gradients_norms.png")
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(epochs) + 2), max(2.5, 0.35 * n + 1.2)))
    im = ax.imshow(q["cosine"].T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks(range(n), _short(layers), fontsize=7)
    step = max(1, len(epochs) // 15)
    ax.set_xticks(range(0, len(epochs), step), epochs[::step])
    ax.set(xlabel="epoch", title="cosine(clean gradient, noisy gradient)")
    fig.colorbar(im, ax=ax)
    cos = save_figure(fig, out, "gradients_cosine.png")
    later = epochs >= 2
    rows = [[layers[i], f"{np.nanmean(q['norm_clean'][later, i]):.3g}", f"{np.nanmean(q['norm_noisy'][later, i]):.3g}",
             float(np.nanmean(q["cosine"][later, i]))] for i in range(n)]
    return ("## Gradient accounting\n\nNorm of the gradient of the mean clean, noisy and total loss, per "
            "parameter, and the cosine between the clean and noisy gradients.\n\n"
            f"![gradient norms]({norms})\n\n![cosine]({cos})\n\nMeans over epochs >= 2:\n\n"
            + table(["layer", "clean norm", "noisy norm", "cosine"], rows))


def _heatmaps(acc: np.ndarray, subsets: list[str], layers: list[str], xs, xlabel: str, title: str,
              out: Path, name: str) -> str:
    """One heatmap per subset of an accuracy array (layer, x, subset)."""
    fig, axes = plt.subplots(1, len(subsets), figsize=(3.4 * len(subsets) + 1, max(2.4, 0.35 * len(layers) + 1.3)),
                             squeeze=False)
    step = max(1, -(-len(xs) // 6))
    for j, (ax, sub) in enumerate(zip(axes[0], subsets)):
        im = ax.imshow(100 * acc[:, :, j], aspect="auto", vmin=0, vmax=100, cmap="viridis", interpolation="nearest")
        ax.set_title(LABELS.get(sub, sub), fontsize=9)
        ax.set_xticks(range(0, len(xs), step), np.asarray(xs)[::step])
        ax.set_xlabel(xlabel)
        ax.set_yticks(range(len(layers)), _short(layers) if j == 0 else [], fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy (%)")
    fig.suptitle(title, fontsize=10, y=1.04)
    with atomic_path(out / name) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return name


def _accuracy_rows(layers, subsets, acc_per_layer, base, base_label):
    rows = [[layers[i]] + [100 * a for a in acc_per_layer[i]] for i in range(len(layers))]
    return table(["layer"] + [LABELS.get(s, s) for s in subsets], rows + [[base_label] + [100 * b for b in base]],
                  digits=1)


def plot_rewind(res, out: Path, run: Run | None = None) -> str:
    """Heatmaps [layer x rewind epoch] of clean / noisy / test accuracy."""
    layers, subsets, epochs = _names(res), _names(res, "subset"), res["checkpoint"].values
    acc, base = res["accuracy"].values, res["baseline"].values   # (R, L, S), (S,)
    name = _heatmaps(acc.transpose(1, 0, 2), subsets, layers, epochs, "rewound to epoch",
                     "rewinding one layer of the final model", out, "rewind.png")
    e0 = int(np.argmin(epochs))
    return (f"## Layer rewinding\n\nOne layer at a time is put back to an earlier checkpoint.\n\n![rewind]({name})\n\n"
            f"Accuracy (%) with the layer rewound to epoch {epochs[e0]}:\n\n"
            + _accuracy_rows(layers, subsets, acc[e0], base, "(no rewinding)"))


def plot_retrain(res, out: Path, run: Run | None = None) -> str:
    """Curves per layer of clean / noisy / test accuracy while retraining it on clean data."""
    layers, subsets, epochs = _names(res), _names(res, "subset"), res["epoch"].values
    acc, base = res["accuracy"].values, res["baseline"].values   # (L, E+1, S)
    n = len(layers)
    fig, axes = _grid(n, sharey=True)
    for i, ax in enumerate(axes.flat[:n]):
        for j, sub in enumerate(subsets):
            ax.plot(epochs, 100 * acc[i, :, j], color=COLORS.get(sub), label=LABELS.get(sub, sub))
        ax.set_title(_short([layers[i]])[0], fontsize=9)
        ax.set_ylim(0, 101)
        ax.set_xlabel("retraining epoch")
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[0, 0].legend(fontsize=7)
    name = save_figure(fig, out, "retrain.png")
    return ("## Layer retraining\n\nOne layer at a time is reset to initialisation and retrained alone on the "
            f"clean examples.\n\n![retrain]({name})\n\nAccuracy (%) after retraining:\n\n"
            + _accuracy_rows(layers, subsets, acc[:, -1], base, "(final model)"))


def plot_flip(res, out: Path, run: Run | None = None) -> str:
    """Units needed to flip noisy vs clean examples, and where the critical units are."""
    cfg = res.config
    searched = res["status"].values == 0
    noisy = res["is_noisy"].values.astype(bool)
    n_units, flipped = res["n_units"].values, res["flipped"].values
    hist = res["layer_hist"].values                              # (K, R, L)
    layers = _names(res)
    collateral = res["collateral"].values
    cap = int(cfg.get("max_units", n_units.max(initial=0)))
    count = np.where(flipped, n_units, cap + 1).mean(1)      # the neuron-count score
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.histogram_bin_edges(count[searched], bins=min(cap + 2, 40)) if searched.any() else 10
    groups = {"clean": searched & ~noisy, "noisy": searched & noisy}
    for key, rows in groups.items():
        if rows.any():
            a.hist(count[rows], bins=bins, alpha=0.6, color=COLORS[key], label=f"{key} (n={rows.sum()})")
    a.set(xlabel=f"units zeroed to flip the prediction (> {cap} = not flipped)", ylabel="examples",
          title="units needed")
    a.legend(fontsize=8)
    width = 0.4
    x = np.arange(len(layers))
    for k, (key, rows) in enumerate(groups.items()):
        total = hist[rows].sum(axis=(0, 1)).astype(float)
        if total.sum():
            b.bar(x + (k - 0.5) * width, 100 * total / total.sum(), width, color=COLORS[key], label=key)
    b.set_xticks(x, _short(layers), rotation=45 if len(layers) > 4 else 0, ha="right" if len(layers) > 4 else "center",
                 fontsize=7)
    b.set(ylabel="% of zeroed units", title="layer of the critical units")
    if b.get_legend_handles_labels()[0]:   # no units zeroed at all: nothing to label
        b.legend(fontsize=8)
    name = save_figure(fig, out, "flip.png")
    rows = []
    for key, r in groups.items():
        if r.any():
            rows.append([key, int(r.sum()), float(np.median(count[r])), 100 * float(flipped[r].mean())])
    text = (f"## Unit zeroing (flip)\n\nGreedy gradient-guided zeroing of units (site `{cfg.get('site')}`, "
            f"at most {cap} units) until the example's prediction changes.\n\n![flip]({name})\n\n"
            + table(["examples", "searched", "median units", "% flipped"], rows, digits=1))
    if groups["clean"].any() and groups["noisy"].any():
        from sklearn.metrics import roc_auc_score
        auc = roc_auc_score(noisy[searched], -count[searched])
        text += f"\n\nAUROC of 'fewer units = noisy' on the searched examples: {auc:.3f}."
    if collateral is not None and np.isfinite(collateral).any():
        mean = np.nanmean(collateral[searched], axis=(0, 1))
        text += ("\n\nMean accuracy (%) of the model with one example's units zeroed (collateral damage): "
                 + ", ".join(f"{LABELS.get(s, s)} {100 * v:.1f}" for s, v in zip(_names(res, "subset"), mean)) + ".")
    return text


def plot_detect(res, out: Path, run: Run | None = None) -> str:
    """The detection table of every score and its ROC / precision-recall curves (from the run's scores)."""
    names, metrics = _names(res, "score"), _names(res, "metric")
    values, size = res["values"].values, res["size"].values
    text = "## Noise detection\n\nHow well each per-example score ranks the noisy examples first.\n\n"
    if run is not None and run.results_path("scores").is_file():
        sc = run.result("scores")
        kept = [n for n in names if n in sc]
        plot_curves({n: sc[n].values for n in kept}, run.is_noisy, {n: int(sc[n].attrs["direction"]) for n in kept},
                    out / "detect_roc.png",
                    title=f"{run.path.name}: {int(run.is_noisy.sum())} of {run.num_train} labels noisy")
        text += "![detection curves](detect_roc.png)\n\n"
    rows = [[n] + [float(v) for v in values[i]] + [int(size[i])] for i, n in enumerate(names)]
    return text + table(["score"] + metrics + ["examples"], rows)


def plot_dropout(res, out: Path, run: Run | None = None) -> str:
    """Example-tied dropout: accuracy per subset in test mode vs drop mode (bar chart and table)."""
    acc, modes, subsets = res["accuracy"].values, _names(res, "mode"), _names(res, "subset")
    layers = _names(res)
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
            + f".\n\n![dropout]({name})\n\n"
            + table(["model"] + [LABELS.get(s, s) for s in subsets], rows, digits=1))


PLOTTERS = {"gradients": plot_gradients, "rewind": plot_rewind, "retrain": plot_retrain, "flip": plot_flip,
            "detect": plot_detect, "dropout": plot_dropout}
