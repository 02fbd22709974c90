"""The report's own section: training curves of the run (every analysis draws its own section,
``plot=`` of its declaration)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.figures import COLORS, LABELS, figure, plt, save_figure, table
from ..core.run import Run

__all__ = ["plot_training"]


def plot_training(run: Run, out: Path) -> str:
    """Accuracy curves over epochs, and mean loss of clean vs noisy examples (a language model's run:
    :func:`memloc.reporting.lm.plot_lm_training`)."""
    if run.is_lm:
        from .lm import plot_lm_training
        return plot_lm_training(run, out)
    m = run.metrics()
    epochs = np.arange(len(m["test_accuracy"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("clean", "noisy", "noisy_true", "test"):
        a.plot(epochs, 100 * m[f"{key}_accuracy"], color=COLORS[key], label=LABELS[key])
    etd = bool(run.config.get("etd_after"))        # evaluated with the dropout layers in test mode
    a.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 101),
          title="accuracy during training" + (" (dropout in test mode)" if etd else ""))
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
            f"{run.final_epoch} epochs"
            + ("; accuracies are measured with the example-tied dropout in test mode (memorisation units "
               "scaled by p_mem), which hides much of the memorisation: the Example-tied dropout section has "
               "train and drop mode" if run.config.get("etd_after") else "") + ".\n\n"
            + figure("training", name, "left, accuracy per epoch on the clean training examples, on the noisy ones "
                     "by their given (wrong) label and by their true label, and on the test set: the noisy curve "
                     "climbing to 100% late in training is memorisation. Right, the mean loss of clean and noisy "
                     "examples (log scale): the noisy loss falling is the wrong labels being fit.") + "\n\n"
            + table(["final accuracy on", "%"], rows, digits=1))
