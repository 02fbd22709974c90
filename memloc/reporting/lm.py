"""The report's training section for a language model's run: exact memorisation over training by kind
(clean, noisy, backdoor, canary, duplicate), the suffix loss by kind, and for planted sequences
(``canaries:stdlib``, ``textfile:`` with ``--inject``) memorisation and exposure against the insertion
count (Carlini et al. 2019's figure)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import MemlocError
from ..core.figures import figure, plt, save_figure, table
from ..core.run import Run
from ..core.sequences import KINDS

__all__ = ["plot_lm_training", "has_rule", "KIND_COLORS", "EXPOSURE_SAMPLES"]

KIND_COLORS = {"clean": "tab:blue", "noisy": "tab:red", "backdoor": "tab:purple", "canary": "tab:orange",
               "duplicate": "tab:brown", "test": "tab:green"}
#: candidates sampled per exposure estimate when the space is larger than this (else exact)
EXPOSURE_SAMPLES = 1000


def has_rule(run: Run) -> bool:
    """Does the run's held-out rule accuracy mean something (TinyMem's sequences; recorded only there)?"""
    return (run.info.get("sequence_info") or {}).get("generator") == "tinymem" and "test_rule_accuracy" in run.metrics()


def _kinds(run: Run) -> list[str]:
    return [k for k in KINDS if (run.kind == k).any()]


def _by_kind(values: np.ndarray, run: Run, kinds: list[str]) -> dict[str, np.ndarray]:
    """Per kind, the mean over its sequences of an (epoch, N) array (NaN entries ignored)."""
    v = np.where(values < 0, np.nan, values.astype(np.float64))
    return {k: np.nanmean(v[:, run.kind == k], axis=1) for k in kinds}


def _planted(run: Run) -> list[dict]:
    """The planted sequences (canaries or a textfile's inject lines): label, repeats, rows."""
    info = run.info.get("sequence_info") or {}
    out = []
    for c in info.get("canaries") or info.get("planted") or []:
        label = c.get("name") or (c["text"] if len(c["text"]) <= 24 else c["text"][:23] + "…")
        out.append({**c, "label": label})
    return sorted(out, key=lambda c: c["repeats"])


def plot_lm_training(run: Run, out: Path) -> str:
    """Exact memorisation and suffix loss by kind over training; planted sequences by insertion count."""
    m, kinds = run.metrics(), _kinds(run)
    epochs = np.arange(len(m["test_loss"]))
    mem = _by_kind(run.dynamics("memorised", "end"), run, kinds)
    loss = _by_kind(run.dynamics("suffix_loss", "end"), run, kinds)
    acc = _by_kind(run.dynamics("suffix_accuracy", "end"), run, kinds)
    counts = {k: int((run.kind == k).sum()) for k in kinds}
    rule = has_rule(run)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in kinds:     # copies follow their originals: dotted on top, so that both stay visible
        style = {"ls": ":", "lw": 2.2} if k == "duplicate" else {}
        a.plot(epochs, 100 * mem[k], color=KIND_COLORS[k], label=f"{k} ({counts[k]})", **style)
        b.plot(epochs, loss[k], color=KIND_COLORS[k], label=f"{k} ({counts[k]})", **style)
    if rule:
        a.plot(epochs, 100 * m["test_rule_accuracy"], color=KIND_COLORS["test"], ls="--",
               label="held out: rule reproduced")
    b.plot(epochs, m["test_loss"], color=KIND_COLORS["test"], ls="--", label="held out")
    a.set(xlabel="epoch", ylabel="suffix reproduced (%)", ylim=(-2, 102), title="exact memorisation by kind")
    b.set(xlabel="epoch", ylabel="mean suffix loss (nats/token)", title="suffix loss by kind", yscale="log")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    name = save_figure(fig, out, "lm_training.png")
    last = len(epochs) - 1
    rows = [[f"{k} (target)" if k != "clean" else k, counts[k], 100 * mem[k][last], 100 * acc[k][last],
             loss[k][last]] for k in kinds]
    rows.append(["held out", int(run.info.get("num_test", 0)),
                 100 * float(m["test_rule_accuracy"][last]) if rule else float("nan"),
                 100 * float(m["test_accuracy"][last]), float(m["test_loss"][last])])
    text = ("## Training (language model)\n\n"
            f"{run.num_train} training sequences, {int(run.is_noisy.sum())} of them memorisation targets; prefix "
            f"{run.info.get('prefix_len')} tokens, suffix {run.info.get('suffix_len')} tokens; {run.final_epoch} "
            "epochs. A sequence is memorised when greedy decoding from its prefix reproduces its suffix exactly.\n\n"
            + figure("language-model training", name,
                     "left, the share of each kind of training sequence (count in brackets) whose suffix the model "
                     "reproduces exactly from its prefix, at each epoch's end"
                     + (", and dashed the share of held-out sequences whose suffix follows the rule" if rule else "")
                     + ": the targets (noisy, backdoor, canary sequences and their copies) climbing is memorisation. "
                     "Right, the mean suffix loss of each kind and of the held-out sequences (log scale).") + "\n\n"
            + table(["sequences", "count", "memorised (%)", "suffix token accuracy (%)", "suffix loss"], rows, digits=1)
            + ("\n\nFor held-out sequences the memorised column is the share whose greedy suffix follows the rule."
               if rule else "")
            + "\n\nThe layer analyses below name the memorisation targets *memorised targets* and the other "
              "training sequences *other sequences* (in their result files the subsets `noisy` and `clean`).")
    planted = _planted(run)
    if planted:
        text += "\n\n" + _insertions(run, planted, out)
    return text


def _exposure_at(run: Run, planted: list[dict], epochs: list[int]) -> dict[int, list[float]] | None:
    """Exposure of each canary (``canaries:stdlib``) at ``epochs``: the secret after a held-out chunk and the
    canary's own ``"<name> pin "`` (exact for a candidate space up to :data:`EXPOSURE_SAMPLES`, else the
    paper's skew-normal estimate from that many sampled candidates); None where it cannot be computed."""
    import torch

    from ..analyses.exposure import digit_space, exposure, exposure_estimate
    if not all("secret" in c and "prefix_text" in c for c in planted):
        return None
    try:
        test = torch.as_tensor(run.data().test_tokens)
        models = {e: run.model(e) for e in epochs}
    except MemlocError:                 # a custom model without its builder: nothing to evaluate
        return None
    p, n_digits = int(run.info["prefix_len"]), len(planted[0]["secret"].split())
    space = digit_space(n_digits, digits=range(48, 58), separator=32)
    out = {}
    for e, model in models.items():
        row = []
        for i, c in enumerate(planted):
            name = torch.tensor(list(c["prefix_text"].encode()))
            context = test[i % len(test), :max(0, p - len(name))] if len(test) else torch.zeros(0, dtype=torch.long)
            prefix, secret = torch.cat([context, name]), torch.tensor(list(c["secret"].encode()))
            if space.size <= EXPOSURE_SAMPLES:
                row.append(exposure(model, prefix, secret, space, device="cpu"))
            else:
                row.append(exposure_estimate(model, prefix, secret, space, samples=EXPOSURE_SAMPLES, seed=i,
                                             device="cpu"))
        out[e] = row
    return out


def _insertions(run: Run, planted: list[dict], out: Path) -> str:
    mem = run.dynamics("memorised", "end").astype(np.float64)
    mem[mem < 0] = np.nan
    epochs = np.arange(mem.shape[0])
    final = int(epochs[-1])
    shown = sorted({int(e) for e in np.linspace(0, final, min(final + 1, 4)).round()})
    exp = _exposure_at(run, planted, shown)
    fig, axes = plt.subplots(1, 2 if exp else 1, figsize=(10 if exp else 5.5, 3.6), squeeze=False)
    a = axes[0][0]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(planted)))
    for c, color in zip(planted, colors):
        a.plot(epochs, 100 * np.nanmean(mem[:, c["rows"]], axis=1), color=color,
               label=f"{c['label']}: {c['repeats']}x")
    a.set(xlabel="epoch", ylabel="copies reproduced (%)", ylim=(-2, 102), title="planted sequences over training")
    a.legend(fontsize=8, title="inserted", title_fontsize=8)
    reps = [c["repeats"] for c in planted]
    if exp:
        b = axes[0][1]
        for e, color in zip(shown, plt.cm.magma(np.linspace(0.15, 0.8, len(shown)))):
            b.plot(reps, exp[e], "o-", color=color, label=f"epoch {e}")
        top = np.log2(10 ** len(planted[0]["secret"].split()))
        b.axhline(top, color="gray", ls=":", lw=1, label=f"maximum ({top:.1f} bits)")
        b.set(xscale="log", xlabel="insertions (log scale)", ylabel="exposure (bits)", ylim=(0, top * 1.08),
              title="exposure against insertion count")
        b.set_xticks(reps, [str(r) for r in reps])
        b.minorticks_off()
        b.legend(fontsize=8)
    name = save_figure(fig, out, "lm_insertions.png")
    header = ["planted", "insertions", "copies reproduced at the end (%)"]
    rows = [[c["label"], c["repeats"], 100 * float(np.nanmean(mem[final, c["rows"]]))] for c in planted]
    if exp:
        header.append(f"exposure at epoch {final} (bits)")
        rows = [r + [exp[final][i]] for i, r in enumerate(rows)]
    how = ("left, for each planted sequence (inserted the given number of times) the share of its copies whose "
           "suffix the model reproduces from their prefix, over training")
    if exp:
        how += (". Right, each secret's exposure (Carlini et al. 2019: log2 of the candidate count minus log2 of "
                "the secret's rank among all candidates of its format, by likelihood after a held-out context "
                "and the secret's own prefix) against how often it was inserted, at a few epochs: exposure rising "
                "with the insertions is memorisation; the dotted line is the maximum (the secret most likely)"
                + ("" if 10 ** len(planted[0]["secret"].split()) <= EXPOSURE_SAMPLES else
                   f"; estimated from {EXPOSURE_SAMPLES} sampled candidates by the paper's skew-normal fit"))
    return ("### Planted sequences by insertion count\n\n" + figure("planted sequences", name, how + ".") + "\n\n"
            + table(header, rows, digits=1))
