"""Report sections of the neuron localisation results of a language model: ``localise_neurons`` (where
each method's top neurons lie, how many zeroed neurons break a suffix), ``inj`` (MemPi's known-answer
recall) and ``del`` (MemPi's DEL: deletion against specificity)."""
from __future__ import annotations

import numpy as np

from ...core.figures import coord_names, figure, plt, save_figure, table

__all__ = ["plot_localise", "plot_inj", "plot_del", "TOP"]

#: a target's top neurons counted per layer in the localisation section
TOP = 10


def _names(res, coord="method") -> list[str]:
    return coord_names(res, coord)


def plot_localise(res, out, run=None) -> str:
    """Per method, where each target's top neurons lie by layer; greedy zeroing's count per target."""
    methods, layers = _names(res), _names(res, "layer")
    score = res["score"].values                      # (method, target, layer, neuron)
    m, t, n_layer, width = score.shape
    k = min(TOP, n_layer * width)
    heads = res.config.get("units") == "heads"
    unit, where = ("heads", "attention layers") if heads else ("neurons", "MLP layers")
    share = np.zeros((m, n_layer))
    for i in range(m):
        flat = np.nan_to_num(score[i].reshape(t, -1), nan=-np.inf)
        top = np.argsort(-flat, axis=1, kind="stable")[:, :k] // width      # layer of each top neuron
        share[i] = np.bincount(top.ravel(), minlength=n_layer) / max(top.size, 1)
    greedy = "greedy_zeroed" in res and "greedy" in methods
    fig, axes = plt.subplots(1, 2 if greedy else 1, figsize=(11 if greedy else 6, 3.6), squeeze=False)
    a = axes[0][0]
    bar = 0.8 / n_layer
    x = np.arange(m)
    for j, (layer, color) in enumerate(zip(layers, plt.cm.viridis(np.linspace(0.1, 0.9, n_layer)))):
        a.bar(x + (j - (n_layer - 1) / 2) * bar, 100 * share[:, j], bar, color=color, label=layer)
    a.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
    a.set(ylabel=f"top-{k} {unit} in the layer (%)", ylim=(0, 100), title=f"where each method's top {unit} lie")
    a.legend(fontsize=7)
    rows = [[meth, f"{float(res['seconds'].values[i]):.2f}"] + [100 * v for v in share[i]] for i, meth in enumerate(methods)]
    how = (f"left, for each method the share of every target's {k} highest-scoring {'' if heads else 'MLP '}{unit} that lie in each "
           "layer (mean over targets): a method that concentrates them in one layer says the memorised suffixes "
           "are stored there")
    if greedy:
        b = axes[0][1]
        zeroed, kind = res["greedy_zeroed"].values, res["kind"].values.astype(str)
        broken = res["greedy_broken"].values.astype(bool) if "greedy_broken" in res else np.ones(len(zeroed), bool)
        bins = np.arange(0, max(int(zeroed.max()), 1) + 2) - 0.5 if zeroed.max() <= 40 else 20
        for kd in sorted(set(kind)):
            rows_k = (kind == kd) & broken
            if rows_k.any():
                b.hist(zeroed[rows_k], bins=bins, alpha=0.6, label=f"{kd} (n={int(rows_k.sum())})")
        b.set(xlabel=f"{unit} zeroed until the suffix is no longer reproduced", ylabel="targets",
              title=f"greedy zeroing: {unit} per target")
        b.legend(fontsize=8)
        how += (f". Right, how many {unit} memloc's greedy zeroing removed before each target's suffix stopped "
                "being reproduced, by kind (targets it could not break are left out): few means the sequence "
                f"hangs on a few {unit}")
    name = save_figure(fig, out, "localise_neurons.png")
    text = (f"## {unit.capitalize()} holding memorised sequences\n\n{t} target sequences, {n_layer} {where} of {width} "
            f"{unit} each, scored by every method (`memloc localise-neurons`).\n\n"
            + figure("localisation", name, how + ".") + "\n\n"
            + table(["method", "seconds"] + [f"{layer} (%)" for layer in layers], rows, digits=1))
    if greedy:
        text += (f"\n\nGreedy zeroing broke {int(broken.sum())} of {len(zeroed)} targets, after a median of "
                 f"{float(np.median(zeroed[broken])) if broken.any() else float('nan'):.0f} {unit}.")
    return text


def _unit(res) -> str:
    """What a result's units are called: "heads" (config units heads) or "neurons"."""
    return "heads" if res.config.get("units") == "heads" else "neurons"


def plot_inj(res, out, run=None) -> str:
    """MemPi's INJ: each method's recall of the neurons (or heads) a sequence was injected into."""
    methods, unit = _names(res), _unit(res)
    ok = res["injected_ok"].values.astype(bool)
    recall = res["recall"].values[:, ok].reshape(len(methods), -1)           # (method, sequence x layer)
    mean = recall.mean(1) if recall.size else np.full(len(methods), np.nan)
    se = recall.std(1, ddof=1) / np.sqrt(recall.shape[1]) if recall.shape[1] > 1 else np.zeros(len(methods))
    seconds = res["seconds"].values[:, ok].mean(1) if ok.any() else np.full(len(methods), np.nan)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    order = np.argsort(-np.nan_to_num(mean, nan=-1))
    ax.bar(np.arange(len(methods)), 100 * mean[order], yerr=100 * se[order], color="tab:blue", capsize=3)
    ax.set_xticks(np.arange(len(methods)), [methods[i] for i in order], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=f"recall of injected {unit} (%)", ylim=(0, 105),
           title=f"INJ: {int(ok.sum())} injected sequences, {res.sizes['slot']} {unit} per layer")
    name = save_figure(fig, out, "inj.png")
    rows = [[methods[i], 100 * mean[i], seconds[i]] for i in order]
    what = "attention heads (their output-projection columns)" if unit == "heads" else "neurons"
    return ("## Known-answer benchmark (INJ)\n\nMemPi's benchmark: new sequences are written into the output weights "
            f"of a few random {what} per layer until the model reproduces them; each method should rank those "
            f"{unit} first.\n\n"
            + figure("inj recall", name, f"per method, the share of the injected {unit} among its top-ranked {unit} "
                     "of each layer (mean over sequences and layers, with its standard error); random is the floor.")
            + "\n\n" + table(["method", "recall (%)", "seconds per sequence"], rows, digits=2))


def plot_del(res, out, run=None) -> str:
    """MemPi's DEL: targets deleted against the other memorised sequences kept, per method and fraction."""
    methods, fractions, unit = _names(res), res["fraction"].values, _unit(res)
    deleted = 1 - res["memorised"].values.astype(float).mean(2)         # (method, fraction)
    kept = np.nanmean(res["kept"].values, axis=2)
    test = res["test_accuracy"].values.mean(2)
    before = float(res["test_accuracy_before"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = plt.cm.tab10(np.arange(len(methods)) % 10)
    for i, (meth, color) in enumerate(zip(methods, colors)):
        a.plot(100 * fractions, 100 * deleted[i], "o-", color=color, label=meth)
        b.plot(100 * deleted[i], 100 * kept[i], "o-", color=color, label=meth)
    a.set(xscale="log", xlabel=f"{unit} zeroed per layer (%)", ylabel="targets deleted (%)", ylim=(-2, 102),
          title="deletion by method")
    a.set_xticks(100 * fractions, [f"{100 * f:g}" for f in fractions])
    a.minorticks_off()
    b.set(xlabel="targets deleted (%)", ylabel="other memorised kept (%)", xlim=(-2, 102), ylim=(-2, 102),
          title="deletion against specificity")
    a.legend(fontsize=7)
    name = save_figure(fig, out, "del.png")
    rows = [[meth, f"{100 * fractions[j]:g}", 100 * deleted[i, j], 100 * kept[i, j], 100 * test[i, j]]
            for i, meth in enumerate(methods) for j in range(len(fractions))]
    return (f"## Deleting memorised sequences (DEL)\n\nMemPi's DEL on {res.sizes['target']} sequences the model "
            f"memorised: each method's top {unit} of every layer are zeroed, one target at a time.\n\n"
            + figure("del", name, "left, the share of targets no longer reproduced after zeroing each method's top "
                     f"{unit} for the target (a share of every layer's {unit}, at least one). Right, that share "
                     "against the share of the other memorised sequences still reproduced: the best methods sit top "
                     "right (the target gone, the rest kept).")
            + "\n\n" + table(["method", f"{unit} zeroed per layer (%)", "deleted (%)", "others kept (%)",
                              f"held-out token accuracy (%; before {100 * before:.1f})"], rows, digits=1))
