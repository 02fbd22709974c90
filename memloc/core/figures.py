"""Drawing primitives every report section shares: colours and labels of the subsets, figure
grids and heatmaps, atomic PNG saving, Markdown tables. matplotlib (Agg) is imported on first use.

An analysis draws its own report section next to its code (``plot=`` of its declaration,
:mod:`memloc.core.registry`) with these.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .runtime import atomic_path

__all__ = ["plt", "COLORS", "LABELS", "LM_LABELS", "subset_label", "subset_color", "groups", "save_figure", "figure", "table", "short_names", "coord_names", "grid", "heatmaps",
           "accuracy_rows", "mean_se_axis", "plus_minus"]


class _Pyplot:
    """``matplotlib.pyplot`` with the Agg backend, imported when first used."""

    _module = None

    def __getattr__(self, name):
        if _Pyplot._module is None:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as pyplot
            _Pyplot._module = pyplot
        return getattr(_Pyplot._module, name)


plt = _Pyplot()


COLORS = {"clean": "tab:blue", "noisy": "tab:red", "noisy_true": "tab:orange", "test": "tab:green",
          "total": "tab:gray"}


LABELS = {"clean": "clean train", "noisy": "noisy train (given label)",
          "noisy_true": "noisy train (true label)", "test": "test"}

#: a language model's subsets (rewind, retrain: ``clean_tokens`` / ``test_tokens`` mark them), what each measures
LM_LABELS = {"clean": "non-targets reproduced", "noisy": "targets reproduced", "test": "held out reproduced",
             "clean_tokens": "non-targets (suffix tokens)", "test_tokens": "held out (suffix tokens)"}
LM_COLORS = {"clean_tokens": "tab:cyan", "test_tokens": "tab:olive"}


def subset_label(sub: str, subsets) -> str:
    """The label of subset ``sub`` among ``subsets`` (a language model's words when they are its subsets)."""
    return (LM_LABELS if "test_tokens" in list(subsets) else LABELS).get(sub, sub)


#: how a section's text names the two groups of training examples: an image run's, a language model's
GROUPS = {False: {"noisy": "noisy examples", "clean": "clean examples", "all": "all examples",
                  "memorised": "memorised (noisy) labels", "still": "wrong labels still fit", "test": "test"},
          True: {"noisy": "memorised targets", "clean": "other sequences", "all": "all sequences",
                 "memorised": "memorised targets", "still": "memorised targets still reproduced", "test": "held-out"}}


def groups(run) -> dict:
    """:data:`GROUPS`' words for ``run`` (a language model's when it is one, an image run's when it is None)."""
    return GROUPS[bool(getattr(run, "is_lm", False))]


def subset_color(sub: str):
    return COLORS.get(sub) or LM_COLORS.get(sub)


def save_figure(fig, out: Path, name: str) -> str:
    try:
        fig.tight_layout()
        with atomic_path(out / name) as tmp:    # a killed report never leaves a half-written figure
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return name


def figure(alt: str, name: str, how_to_read: str) -> str:
    """A report figure in Markdown: the image and, below it, one paragraph saying what it shows and how to
    read it (``*How to read: ...*``; the HTML report makes it the figure's caption)."""
    return f"![{alt}]({name})\n\n*How to read: {how_to_read}*"


def table(header: list[str], rows: list[list], digits: int = 3) -> str:
    """A Markdown table; floats with ``digits`` decimals, NaN as '-'."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "-" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def short_names(names) -> list[str]:
    """Layer names short enough for tick labels."""
    return [n if len(n) <= 18 else "…" + n[-17:] for n in names]


def coord_names(res, coord: str = "layer") -> list[str]:
    return [str(n) for n in res[coord].values]


def grid(n: int, width: float = 3.2, height: float = 2.6, **kw):
    """A figure with one small axis per layer (at most 4 per row); unused axes hidden."""
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kw)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes


def heatmaps(acc: np.ndarray, subsets: list[str], layers: list[str], xs, xlabel: str, title: str,
              out: Path, name: str) -> str:
    """One heatmap per subset of an accuracy array (layer, x, subset)."""
    fig, axes = plt.subplots(1, len(subsets), figsize=(3.4 * len(subsets) + 1, max(2.4, 0.35 * len(layers) + 1.3)),
                             squeeze=False)
    step = max(1, -(-len(xs) // 6))
    for j, (ax, sub) in enumerate(zip(axes[0], subsets)):
        im = ax.imshow(100 * acc[:, :, j], aspect="auto", vmin=0, vmax=100, cmap="viridis", interpolation="nearest")
        ax.set_title(subset_label(sub, subsets), fontsize=9)
        ax.set_xticks(range(0, len(xs), step), np.asarray(xs)[::step])
        ax.set_xlabel(xlabel)
        ax.set_yticks(range(len(layers)), short_names(layers) if j == 0 else [], fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy (%)")
    fig.suptitle(title, fontsize=10, y=1.04)
    with atomic_path(out / name) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return name


def accuracy_rows(layers, subsets, acc_per_layer, base, base_label):
    rows = [[layers[i]] + [100 * a for a in acc_per_layer[i]] for i in range(len(layers))]
    return table(["layer"] + [subset_label(s, subsets) for s in subsets], rows + [[base_label] + [100 * b for b in base]],
                  digits=1)


def mean_se_axis(values: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[axis]
    se = v.std(axis=axis, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(v.mean(axis=axis).shape)
    return v.mean(axis=axis), se


def plus_minus(mean: float, se: float, n: int, scale: float = 100, digits: int = 1) -> str:
    """``92.4 ± 0.3`` (in percent), or the mean alone for one seed."""
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if n > 1 else "")
