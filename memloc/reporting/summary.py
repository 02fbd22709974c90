"""The findings summary at the top of a report: where memorisation lives, how many labels look wrong,
what fixing gave, each computed from the results the run has (a finding whose result is absent is
left out)."""
from __future__ import annotations

import numpy as np

from ..core.run import Run
from ..core.prerequisites import command_line

__all__ = ["findings"]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _lm_training(run: Run) -> str:
    m = run.metrics()
    mem = run.dynamics("memorised", "end")[-1] == 1
    targets = int(run.is_noisy.sum())
    held = (f"held-out rule accuracy {_pct(float(m['test_rule_accuracy'][-1]))}, "
            if "test_rule_accuracy" in m and (run.info.get("sequence_info") or {}).get("generator") == "tinymem" else "")
    fit = (f"{targets} of {run.num_train} training sequences are memorisation targets and the model reproduces "
           f"{_pct(float(mem[run.is_noisy].mean()))} of them from their prefix" if targets else
           f"{run.num_train} training sequences, none a memorisation target; the model reproduces "
           f"{_pct(float(mem.mean()))} of them from their prefix")
    clean = f" (the other sequences: {_pct(float(mem[~run.is_noisy].mean()))})" if targets and (~run.is_noisy).any() else ""
    return (f"**Training**: {fit}{clean}; {held}held-out suffix token accuracy {_pct(float(m['test_accuracy'][-1]))} "
            f"after {run.final_epoch} epochs.")


def _training(run: Run) -> str | None:
    if run.is_lm:
        return _lm_training(run)
    m = run.metrics()
    noisy = int(run.is_noisy.sum())
    if not noisy:
        return (f"**Training**: {run.num_train} examples with no known wrong label; test accuracy "
                f"{_pct(float(m['test_accuracy'][-1]))} after {run.final_epoch} epochs.")
    if run.config.get("etd_after"):      # evaluated with the dropout layers in test mode, which hides memorisation
        return (f"**Training**: {noisy} of {run.num_train} training labels are wrong; with its example-tied dropout "
                f"in test mode the model predicts {_pct(float(m['noisy_accuracy'][-1]))} of them, test accuracy "
                f"{_pct(float(m['test_accuracy'][-1]))} after {run.final_epoch} epochs.")
    return (f"**Training**: {noisy} of {run.num_train} training labels are wrong and the model fits "
            f"{_pct(float(m['noisy_accuracy'][-1]))} of them (memorised); test accuracy "
            f"{_pct(float(m['test_accuracy'][-1]))} after {run.final_epoch} epochs.")


#: the words of the findings for an image run and for a language model's (targets in the wrong labels' role)
WORDS = {False: {"clean": "the clean examples", "fit": "of the wrong labels fit", "test": "test", "test_subset": "test",
                 "drop": "the wrong labels fit", "others": "clean"},
         True: {"clean": "the non-target sequences", "fit": "of the memorised targets reproduced",
                "test": "held-out suffix token accuracy", "test_subset": "test_tokens",
                "drop": "the targets reproduced", "others": "non-targets"}}


def _where(results: dict, lm: bool = False) -> list[str]:
    out, w = [], WORDS[lm]
    rt = results.get("retrain")
    if rt is not None and "noisy" in rt["subset"].values and w["test_subset"] in rt["subset"].values:
        last, t = rt["accuracy"].isel(epoch=-1), w["test_subset"]
        noisy, test = last.sel(subset="noisy").to_pandas(), last.sel(subset=t).to_pandas()
        best = str(noisy.idxmin())
        worst = str(noisy.idxmax())
        out.append(f"**Where memorisation lives (retraining)**: retraining `{best}` alone on {w['clean']} "
                   f"leaves {_pct(noisy[best])} {w['fit']} ({w['test']} {_pct(test[best])}; the model itself: "
                   f"{_pct(float(rt['baseline'].sel(subset='noisy')))} and {_pct(float(rt['baseline'].sel(subset=t)))}); "
                   f"retraining `{worst}` leaves {_pct(noisy[worst])}.")
    rw = results.get("rewind")
    if rw is not None and "noisy" in rw["subset"].values:
        first = rw["accuracy"].isel(checkpoint=int(np.argmin(rw["checkpoint"].values)))
        noisy = first.sel(subset="noisy").to_pandas()
        best = str(noisy.idxmin())
        out.append(f"**Rewinding**: putting `{best}` back to epoch {int(rw['checkpoint'].min())} drops {w['drop']} "
                   f"to {_pct(noisy[best])} ({w['others']} {_pct(float(first.sel(subset='clean', layer=best)))}).")
    fl = results.get("flip")
    if fl is not None:
        searched = fl["status"].values == 0
        noisy = fl["is_noisy"].values.astype(bool)
        count = fl["neuron_count"].values
        if (searched & noisy).any() and (searched & ~noisy).any():
            hist = fl["layer_hist"].values[searched & noisy].sum(axis=(0, 1)).astype(float)
            layers = [str(n) for n in fl["layer"].values]
            spread = ", ".join(f"`{layers[i]}` {100 * hist[i] / hist.sum():.0f}%" for i in np.argsort(-hist)[:3]
                               if hist.sum() and hist[i]) or "none zeroed"
            lm = "clean_tokens" in fl["subset"].values          # a language model's run: sequences
            what = (("a memorised target sequence stops being reproduced", "a reproduced clean one", "targets") if lm
                    else ("a wrongly labelled example's prediction flips", "a clean one's", "wrong labels"))
            out.append(f"**Units (flip)**: {what[0]} after a median of "
                       f"{np.median(count[searched & noisy]):.0f} zeroed units, {what[1]} after "
                       f"{np.median(count[searched & ~noisy]):.0f}; the units zeroed for {what[2]} lie in {spread}.")
    etd = results.get("dropout")
    if etd is not None and {"test", "drop"} <= set(etd["mode"].values) and "noisy" in etd["subset"].values:
        acc = etd["accuracy"]
        fit = (f"each example's own mask (train mode) fits {_pct(float(acc.sel(mode='train', subset='noisy')))} "
               "of the wrong labels; " if "train" in etd["mode"].values else "")
        out.append(f"**Example-tied dropout**: {fit}dropping the memorisation units leaves "
                   f"{_pct(float(acc.sel(mode='drop', subset='noisy')))} of the wrong labels predicted (test mode: "
                   f"{_pct(float(acc.sel(mode='test', subset='noisy')))}) at test accuracy "
                   f"{_pct(float(acc.sel(mode='drop', subset='test')))} (test mode: "
                   f"{_pct(float(acc.sel(mode='test', subset='test')))}).")
    return out


def _wrong_labels(run: Run, results: dict) -> list[str]:
    out = []
    iss = results.get("issues")
    if iss is not None:
        flagged = iss["flagged"].values.astype(bool)
        text = (f"**Labels that look wrong (no ground truth used)**: the estimated noise rate is "
                f"{_pct(float(iss['rate_estimate']))}, so the {int(flagged.sum())} most suspicious of {len(flagged)} "
                f"examples are flagged")
        if run.is_noisy.any() and len(run.is_noisy) == len(flagged):
            hit = int((flagged & run.is_noisy).sum())
            text += (f"; against the known wrong labels: precision {hit / max(int(flagged.sum()), 1):.2f}, "
                     f"recall {hit / int(run.is_noisy.sum()):.2f}")
        out.append(text + ".")
    dt = results.get("detect")
    if dt is not None:
        auroc = dt["values"].sel(metric="auroc").to_pandas().dropna()
        if len(auroc):
            out.append(f"**Detection**: the best score is `{auroc.idxmax()}` (AUROC {auroc.max():.3f}), the weakest "
                       f"`{auroc.idxmin()}` ({auroc.min():.3f}).")
    return out


def _best_within_a_point(left, accuracy, before: float) -> str | None:
    """The method (index of the Series) that leaves least of ``left`` among those whose ``accuracy`` is
    within one point of ``before``; None if none is."""
    fair = left[accuracy >= before - 0.01]
    return str(fair.idxmin()) if len(fair) else None


def _fixing(results: dict) -> list[str]:
    out = []
    cl = results.get("clean")
    if cl is not None:
        acc = cl["test_accuracy"].mean("seed").to_pandas()
        seeds = cl.sizes["seed"]
        verb = "relabelling" if cl.config.get("relabel") else "dropping"
        parts = [f"{verb} memloc's {int(cl['flagged'].sel(flags='memloc'))} flagged examples and retraining gives "
                 f"test accuracy {_pct(acc['memloc'])} (all data: {_pct(acc['all'])})"]
        if "cleanlab" in acc.index:
            parts.append(f"cleanlab's flags {_pct(acc['cleanlab'])}")
        out.append("**Fixing (clean)**: " + "; ".join(parts) + f", mean of {seeds} seed(s).")
    un = results.get("unlearn")
    if un is not None:
        acc = un["accuracy"].mean("seed")
        forget, test = acc.sel(group="forget_given").to_pandas(), acc.sel(group="test").to_pandas()
        base_test = float(un["baseline"].sel(group="test"))
        best = _best_within_a_point(forget, test, base_test)
        layer = un.config.get("retrain_layer") if best == "retrain_layer" else None   # which layer, and why
        if best is not None:
            out.append(f"**Unlearning**: `{best}` leaves {_pct(forget[best])} of the forget set's given labels "
                       f"(trained model: {_pct(float(un['baseline'].sel(group='forget_given')))}) at test accuracy "
                       f"{_pct(test[best])} (trained: {_pct(base_test)}), the best of the methods within one test point."
                       + (f" Its layer, `{layer['layer']}`: {layer['chosen_by']}." if layer else ""))
    return out


def _not_yet(run: Run, results: dict) -> str | None:
    """The findings a classifier run's report lacks, each with the command that makes its result first."""
    if run.is_lm:
        return None
    wanted = [("where memorisation lives", ("retrain", "rewind", "flip", "dropout"), "retrain"),
              ("which labels look wrong", ("issues", "detect"), "issues"),
              ("what dropping or relabelling them gives", ("clean", "unlearn"), "clean")]
    parts = [f"{what}: run {command_line(run, name)}" for what, have, name in wanted if not any(h in results for h in have)]
    return "**Not in this report yet**: " + "; ".join(parts) + "." if parts else None


def _language_model(results: dict) -> list[str]:
    """Findings of the language-model results: the neurons that hold memorised sequences, removing them."""
    out = []
    loc = results.get("localise_neurons")
    if loc is not None and "greedy_zeroed" in loc:
        broken = loc["greedy_broken"].values.astype(bool)
        if broken.any():
            heads = loc.config.get("units") == "heads"
            out.append(f"**{'Heads' if heads else 'Neurons'} (greedy zeroing)**: a memorised sequence stops being "
                       f"reproduced after a median of {np.median(loc['greedy_zeroed'].values[broken]):.0f} zeroed "
                       f"{'attention heads' if heads else 'MLP neurons'} ({int(broken.sum())} "
                       f"of {len(broken)} targets broken).")
    mt = results.get("mitigation")
    if mt is not None and mt.sizes["setting"]:
        targets, acc = mt["targets_memorised"].to_pandas(), mt["test_accuracy"].to_pandas()
        before = float(mt["test_accuracy_before"])
        best = _best_within_a_point(targets, acc, before)
        if best is not None:
            out.append(f"**Removing memorised sequences**: `{best}` leaves {_pct(targets[best])} of the targets "
                       f"reproduced (before: {_pct(float(mt['targets_memorised_before']))}) at held-out suffix token "
                       f"accuracy {_pct(acc[best])} (before: {_pct(before)}), the best of the methods within one point.")
    return out


def findings(run: Run, results: dict) -> list[str]:
    """One Markdown sentence per finding the results support, in reading order; then the findings
    whose results are missing, with the command that makes each."""
    out = [_training(run)]
    out += _where(results, run.is_lm)
    out += _wrong_labels(run, results)
    out += _fixing(results)
    out += _language_model(results)
    out.append(_not_yet(run, results))
    return [s for s in out if s]
