"""Report sections of the finding-and-fixing results: label issues, pruning, cleaning, JTT."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.run import Run
from .plots import plt, save_figure, table

__all__ = ["ACTION_PLOTTERS", "plot_issues", "plot_prune", "plot_clean", "plot_jtt"]


def _mean_se(values: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[axis]
    se = v.std(axis=axis, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(v.mean(axis=axis).shape)
    return v.mean(axis=axis), se


def _pm(mean: float, se: float, n: int, scale: float = 100, digits: int = 1) -> str:
    """``92.4 ± 0.3`` (in percent), or the mean alone for one seed."""
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if n > 1 else "")


def plot_issues(res, out: Path, run: Run | None = None) -> str:
    """Suspicion histogram (flagged vs not; noisy vs clean when the run knows), the most suspicious examples."""
    susp, flagged = res["suspicion"].values, res["flagged"].values.astype(bool)
    rate, n = float(res["rate_estimate"]), len(susp)
    known = run is not None and run.is_noisy.any() and len(run.is_noisy) == n
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bins = np.linspace(np.nanmin(susp), np.nanmax(susp), 50)
    if known:
        ax.hist([susp[~run.is_noisy], susp[run.is_noisy]], bins=bins, stacked=True, color=["tab:blue", "tab:red"],
                label=["clean (truth)", "noisy (truth)"])
    else:
        ax.hist(susp, bins=bins, color="tab:gray", label="all examples")
    cut = susp[flagged].min() if flagged.any() else np.nanmax(susp)
    ax.axvline(cut, color="k", ls="--", lw=1, label=f"flag threshold ({flagged.sum()} flagged)")
    ax.set(xlabel=f"suspicion ({res.config.get('by', '')})", ylabel="examples", yscale="log",
           title=f"label issues: estimated noise rate {rate:.1%}")
    ax.legend(fontsize=8)
    name = save_figure(fig, out, "issues.png")
    text = (f"## Label issues (no ground truth used)\n\nEstimated noise rate {rate:.2%} "
            f"({res.config.get('rate_method')}, epoch {res.config.get('checkpoint_k')}); the {flagged.sum()} most "
            f"suspicious of {n} examples are flagged (ranking: {res.config.get('by')}).")
    if known:
        hit = (flagged & run.is_noisy).sum()
        text += (f" Against the run's known noise ({run.is_noisy.mean():.2%}): precision "
                 f"{hit / max(flagged.sum(), 1):.3f}, recall {hit / run.is_noisy.sum():.3f}.")
    top = np.argsort(res["rank"].values)[:10]
    rows = [[int(i), int(res["label_given"][i]), int(res["label_predicted"][i]), float(res["prob_given"][i]),
             float(susp[i])] for i in top]
    return (text + f"\n\n![issues]({name})\n\nMost suspicious examples:\n\n"
            + table(["example", "given", "predicted", "p(given)", "suspicion"], rows))


def plot_prune(res, out: Path, run: Run | None = None) -> str:
    """Test accuracy vs fraction kept per score, random dashed, all data as a line; noisy examples kept."""
    keeps, methods = res["keep"].values, [str(m) for m in res["score"].values]
    noisy = np.isfinite(res["noisy_kept"].values).any()
    fig, axes = plt.subplots(1, 2 if noisy else 1, figsize=(10 if noisy else 5.5, 3.4), squeeze=False)
    ax = axes[0, 0]
    for i, m in enumerate(methods):
        mean, se = _mean_se(res["test_accuracy"].values[i])
        ax.errorbar(keeps, 100 * mean, yerr=100 * se, marker="o", capsize=3, label=m,
                    ls="--" if m == "random" else "-", color="k" if m == "random" else None)
    full, full_se = _mean_se(res["full_accuracy"].values)
    ax.axhline(100 * full, color="tab:gray", lw=1, label=f"all data ({100 * full:.1f})")
    ax.set(xlabel="fraction of the training set kept", ylabel="test accuracy (%)", title=f"pruning ({res.config.get('mode')} kept)")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    if noisy:
        ax = axes[0, 1]
        for i, m in enumerate(methods):
            ax.plot(keeps, 100 * res["noisy_kept"].values[i].mean(-1), marker="o", label=m,
                    ls="--" if m == "random" else "-", color="k" if m == "random" else None)
        ax.set(xlabel="fraction kept", ylabel="mislabeled examples kept (%)", title="noise kept")
        ax.invert_xaxis()
    name = save_figure(fig, out, "prune.png")
    rows = []
    for i, m in enumerate(methods):
        mean, se = _mean_se(res["test_accuracy"].values[i])
        rows.append([m] + [_pm(a, e, res.sizes["seed"]) for a, e in zip(mean, se)])
    return (f"## Pruning\n\nFresh runs on the kept examples (seeds {', '.join(map(str, res['seed'].values))}); "
            f"all data: {_pm(full, full_se, res.sizes['seed'])}%.\n\n![prune]({name})\n\n"
            + table(["score"] + [f"keep {k:g}" for k in keeps], rows))


def plot_clean(res, out: Path, run: Run | None = None) -> str:
    """Test accuracy per cleaning (all data, memloc, cleanlab), with flags' precision / recall."""
    flags = [str(f) for f in res["flags"].values]
    mean, se = _mean_se(res["test_accuracy"].values)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(flags, 100 * mean, yerr=100 * se, capsize=4, color=["tab:gray", "tab:blue", "tab:orange"][:len(flags)])
    low = max(0.0, 100 * np.nanmin(mean) - 5)
    ax.set(ylabel="test accuracy (%)", ylim=(low, min(100, 100 * np.nanmax(mean) + 3)),
           title=f"cleaning: flagged examples {'relabelled' if res.config.get('relabel') else 'dropped'}")
    name = save_figure(fig, out, "clean.png")
    rows = [[f, _pm(mean[i], se[i], res.sizes["seed"], digits=2), int(res["flagged"].values[i]),
             float(res["precision"].values[i]), float(res["recall"].values[i]), float(res["noise_left"].values[i])]
            for i, f in enumerate(flags)]
    return ("## Cleaning\n\nRetrained with the run's recipe on the cleaned training set; cleanlab (K-fold "
            f"cross-validation, same recipe) is the baseline.\n\n![clean]({name})\n\n"
            + table(["flags", "test accuracy (%)", "flagged", "precision", "recall", "noise left"], rows))


def plot_jtt(res, out: Path, run: Run | None = None) -> str:
    """ERM vs JTT accuracy per group."""
    groups, variants = [str(g) for g in res["group"].values], [str(v) for v in res["variant"].values]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    x = np.arange(len(groups))
    for i, v in enumerate(variants):
        mean, se = _mean_se(res["accuracy"].values[i], axis=0)
        ax.bar(x + (i - 0.5) * 0.4, 100 * mean, 0.4, yerr=100 * se, capsize=3, label=v)
    ax.set_xticks(x, groups, fontsize=8)
    ax.set(ylabel="accuracy (%)", ylim=(0, 101), title=f"JTT: error set of epoch {res.config.get('id_epoch')} "
                                                       f"upweighted x{res.config.get('upweight'):g}")
    ax.legend(fontsize=8)
    name = save_figure(fig, out, "jtt.png")
    rows = [[v] + [f"{100 * m:.1f}" for m in _mean_se(res["accuracy"].values[i], axis=0)[0]]
            for i, v in enumerate(variants)]
    noisy = float(res["error_set_noisy"])
    return (f"## JTT\n\nError set: {res.sizes['error']} examples"
            + (f" ({noisy:.1%} mislabeled)" if np.isfinite(noisy) else "") + f".\n\n![jtt]({name})\n\n"
            + table(["training"] + groups, rows))


ACTION_PLOTTERS = {"issues": plot_issues, "prune": plot_prune, "clean": plot_clean, "jtt": plot_jtt}
