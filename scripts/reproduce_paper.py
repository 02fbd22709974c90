"""Check the claims of Maini et al. (ICML 2023) that MNIST-5k can test, with memloc, and write a claims table.

    python scripts/reproduce_paper.py [--models mlp,lenet,resnet9] [--examples noisy:50,clean:50] \
        [--jobs 2] [--runs-dir /tmp/memloc_paper] [--markdown artifacts/paper_claims.md]

Runs (trained into ``--runs-dir`` and reused on a rerun; 10% symmetric noise on MNIST-5k: 4,000
training images, 1,000 test): the MLP (memloc's defaults, 30 epochs), lenet (40 epochs), ResNet-9
of width 16 (40 epochs) and lenet of width 4 with example-tied dropout (p_gen 0.2, p_mem 0.1,
after every ReLU, as in artifacts/etd_experiment.md). All use the paper's optimiser recipe as far as memloc has it (SGD with momentum 0.9,
weight decay 5e-4, a one-cycle "triangle" learning rate); batch 128 and peak lr 0.05 instead of
512 / 0.1 (4,000 images give 8 steps per epoch at 512) and no augmentation.

Per model it computes, each from a memloc analysis of the run:

* gradient accounting (:func:`memloc.gradients`, every checkpoint): the clean / noisy gradient cosine;
* when noisy examples are learned: the first epoch from which the run's end-of-epoch
  predictions match the given label for good (``dynamics/end/correct``), as a fraction of training;
* flip searches (:func:`memloc.flip`, ``--collateral``) on the same examples at the unit site
  (``pre_norm``, memloc's default) and the weight site (the official rule), memloc's objective
  (reference batch of 64 clean examples, no noise copies), at most ``--max-units`` zeroed: how
  many noisy examples flip with fewer than 10, the layers (parameters) of the critical set, the
  accuracy lost when one example's critical set is zeroed, and the AUROC of "fewer zeroed = noisy";
* for the MLP also the full paper protocol (``--protocol paper``: weight site, 5 noised copies,
  B = 512);
* example-tied dropout (:func:`memloc.evaluate_dropout`): noisy labels left in drop mode and its cost.

Verdicts are computed from the numbers with the thresholds written in each row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memloc  # noqa: E402
from _markdown import add_common, finish  # noqa: E402
from memloc.actions.children import train_runs  # noqa: E402
from memloc.core.results import load_result  # noqa: E402
from memloc.training.train import resolve_config  # noqa: E402

BASE = {"dataset": "mnist5k", "noise": 0.1, "seed": 0}
MODELS = {
    "mlp": {"model": "mlp", "epochs": 30},
    "lenet": {"model": "lenet", "epochs": 40},
    "resnet9": {"model": "resnet9", "width": 16, "epochs": 40},
}
ETD = {"model": "lenet", "width": 4, "epochs": 40, "etd_after": "features.1,features.4,classifier.1,classifier.3",
       "p_gen": 0.2, "p_mem": 0.1}
SITES = ("pre_norm", "weight")
FEW = 10      # "fewer than 10 zeroed"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common(p, "/tmp/memloc_paper")
    p.add_argument("--models", default="mlp,lenet,resnet9", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--examples", default="noisy:50,clean:50", help="flip examples (memloc flip --examples)")
    p.add_argument("--resnet-examples", default="noisy:20,clean:20", help="flip examples for resnet9 (CPU time)")
    p.add_argument("--max-units", type=int, default=100, help="flip: give up after this many zeroed units / items")
    p.add_argument("--no-etd", action="store_true", help="skip the example-tied dropout run")
    p.add_argument("--no-paper-protocol", action="store_true", help="skip the MLP's --protocol paper search")
    p.add_argument("--train-only", action="store_true", help="train the runs and stop")
    p.set_defaults(markdown=str(ROOT / "artifacts" / "paper_claims.md"))
    return p.parse_args(argv)


def cached(path: Path, compute):
    """The result saved at ``path``, else ``compute()`` saved there."""
    if path.is_file():
        return load_result(path)
    res = compute()
    res.save(path)
    return res


# ----------------------------------------------------------------------------- measurements
def gradient_cosine(run, device):
    """Cosine of the clean and noisy mean-loss gradients per (epoch, layer), BN in eval mode (memloc's
    default) and, for models with BatchNorm, also in train mode (batch statistics, as during the
    training the paper measures) at every 2nd epoch."""
    def stats(res):
        cos = res["cosine"].values[1:]          # epochs 1.. (epoch 0 is the initialisation)
        cos = cos[np.isfinite(cos)]
        return {"cos_median": float(np.median(cos)), "cos_below": float(np.mean(cos < -0.75))}

    out = {"eval": stats(cached(run.results_path("gradients"), lambda: memloc.gradients(run, device=device)))}
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in run.model().modules()):
        out["train"] = stats(cached(run.path / "results" / "gradients_bntrain.h5", lambda: memloc.gradients(
            run, bn_mode="train", checkpoints=f"0-{run.final_epoch}:2", device=device)))
    return out


def learned_epochs(run):
    """Per example the first epoch from which it is predicted as its given label for good (NaN: never)."""
    correct = run.dynamics("correct", "end")[1:] == 1        # (epochs, N), epoch 1..T
    t = len(correct)
    stays = np.flip(np.cumprod(np.flip(correct, 0), 0), 0).astype(bool)   # correct from this epoch on
    first = np.where(stays.any(0), stays.argmax(0) + 1, np.nan)
    return first / t, t


def learning_phase(run):
    frac, t = learned_epochs(run)
    noisy = run.is_noisy
    fn, fc = frac[noisy], frac[~noisy]
    return {"noisy_median": float(np.nanmedian(fn)), "clean_median": float(np.nanmedian(fc)),
            "noisy_middle": float(np.mean((fn > 0.2) & (fn <= 0.6))), "noisy_never": float(np.mean(np.isnan(fn))),
            "epochs": t}


def flip_stats(run, site, examples, max_units, device, protocol="memloc"):
    name = "flip" if (site, protocol) == ("pre_norm", "memloc") else f"flip_{site}_{protocol}"
    res = cached(run.path / "results" / f"{name}.h5", lambda: memloc.flip(
        run, examples=examples, site=site if protocol == "memloc" else None, protocol=protocol,
        max_units=max_units, collateral=True, device=device, resume=None))
    ok = res["status"].values == 0
    noisy = res["is_noisy"].values.astype(bool)
    n_units, flipped = res["n_units"].values[:, 0], res["flipped"].values[:, 0]
    count = res["neuron_count"].values
    few = flipped & (n_units < FEW)
    hist = res["layer_hist"].values[:, 0]                     # (example, layer)
    layers = [str(v) for v in res["layer"].values]
    share = hist[ok & noisy & flipped].sum(0) / max(1, hist[ok & noisy & flipped].sum())
    test = list(res["subset"].values).index("test")
    col = res["collateral"].values[:, 0, test]
    from sklearn.metrics import roc_auc_score
    auc = roc_auc_score(noisy[ok], -count[ok]) if noisy[ok].any() and (~noisy[ok]).any() else np.nan
    return {"noisy_few": float(few[ok & noisy].mean()), "clean_few": float(few[ok & ~noisy].mean()),
            "noisy_median": float(np.median(n_units[ok & noisy & flipped])) if (ok & noisy & flipped).any() else np.nan,
            "clean_median": float(np.median(n_units[ok & ~noisy & flipped])) if (ok & ~noisy & flipped).any() else np.nan,
            "noisy_flipped": float(flipped[ok & noisy].mean()), "clean_flipped": float(flipped[ok & ~noisy].mean()),
            "auroc": float(auc), "layers_5pct": int((share >= 0.05).sum()), "n_layers": len(layers),
            "last_share": float(_last_share(share, layers, site)), "top_layer": layers[int(np.argmax(share))],
            "col_noisy": float(np.nanmean(col[ok & noisy])), "col_clean": float(np.nanmean(col[ok & ~noisy])),
            "searched": int(ok.sum())}


def _last_share(share, layers, site):
    """Share of the critical set in the last layer (the logits layer; at the unit site, whose
    unit spaces exclude the logits layer, the last unit layer)."""
    if site != "weight":
        return share[-1]
    last = layers[-1].rsplit(".", 1)[0]
    return sum(s for s, n in zip(share, layers) if n.rsplit(".", 1)[0] == last)


def etd_stats(run, device):
    res = memloc.evaluate_dropout(run, device=device)
    acc = res["accuracy"]

    def a(mode, subset):
        return 100 * float(acc.sel(mode=mode, subset=subset))
    return {"drop_noisy": a("drop", "noisy"), "test_noisy": a("test", "noisy"),
            "clean_cost": a("test", "clean") - a("drop", "clean"), "test_cost": a("test", "test") - a("drop", "test")}


# ----------------------------------------------------------------------------- the table
def verdict(flags) -> str:
    flags = list(flags)
    return "holds" if all(flags) else "partly" if any(flags) else "does not hold"


def _collateral_verdict(gaps) -> str:
    """holds: >= 5 points less everywhere; partly: less everywhere or >= 5 points somewhere."""
    if all(g >= 0.05 for g in gaps):
        return "holds (>= 5 points less per model and site)"
    if all(g > 0 for g in gaps):
        return (f"partly: less everywhere, by {100 * min(gaps):.1f}-{100 * max(gaps):.1f} points "
                "(holds = >= 5 points less per model and site)")
    return verdict(g >= 0.05 for g in gaps) + " (>= 5 points less per model and site)"


def pct(v, digits=0):
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.{digits}f}%"


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    names = [m for m in args.models.split(",") if m]
    for m in names:
        if m not in MODELS:
            raise SystemExit(f"reproduce_paper.py: error: unknown model {m!r}; valid: {', '.join(MODELS)}")
    runs_dir = Path(args.runs_dir)
    configs = {m: resolve_config({**BASE, **MODELS[m]}) for m in names}
    if not args.no_etd:
        configs["lenet4_etd"] = resolve_config({**BASE, **ETD})
    train_runs([(runs_dir / k, c) for k, c in configs.items()], jobs=args.jobs, device=args.device, desc="paper")
    if args.train_only:
        return
    runs = {k: memloc.load(runs_dir / k) for k in configs}
    grad, phase, flips, final = {}, {}, {}, {}
    for m in names:
        run = runs[m]
        print(f"[{time.time() - started:.0f} s] {m}: gradients, dynamics, flip", flush=True)
        final[m] = {k: float(v[-1]) for k, v in run.metrics().items()}
        grad[m] = gradient_cosine(run, args.device)
        phase[m] = learning_phase(run)
        ex = args.resnet_examples if m == "resnet9" else args.examples
        for site in SITES:
            flips[m, site] = flip_stats(run, site, ex, args.max_units, args.device)
    paper_protocol = None
    if "mlp" in names and not args.no_paper_protocol:
        paper_protocol = flip_stats(runs["mlp"], "weight", args.examples, args.max_units, args.device, protocol="paper")
    etd = None if args.no_etd else etd_stats(runs["lenet4_etd"], args.device)
    lines = table(args, names, grad, phase, flips, final, paper_protocol, etd, runs_dir)
    finish(lines, started, args.markdown)


def _per_model(names, fn):
    return "; ".join(f"{m}: {fn(m)}" for m in names)


def _sites(names, flips, key, fmt):
    return "; ".join(f"{m}: {fmt(flips[m, 'pre_norm'][key])} / {fmt(flips[m, 'weight'][key])}" for m in names)


def table(args, names, grad, phase, flips, final, paper_protocol, etd, runs_dir):
    ex = f"--examples {args.examples}" + (f" (resnet9: {args.resnet_examples})" if "resnet9" in names else "")
    run = f"{runs_dir}/MODEL"
    rows = []
    # 1. few zeroed
    rows.append(["Noisy examples flip after few zeroed units: >90% with fewer than 10 (Sec. 4, Fig. 6)",
                 ">90% (CIFAR-10 / MNIST / SVHN, weights and channels)",
                 _sites(names, flips, "noisy_few", pct) + " (unit / weight site; clean: "
                 + _sites(names, flips, "clean_few", pct) + ")"
                 + (f"; paper protocol (MLP): {pct(paper_protocol['noisy_few'])}" if paper_protocol else ""),
                 f"`memloc flip {run} {ex} --collateral [--site weight]`",
                 verdict(flips[m, s]["noisy_few"] > 0.9 for m in names for s in SITES) + " (>90% per model and site)"])
    rows.append(["Noisy examples need fewer zeroed units than clean ones (Fig. 6)",
                 "noisy ~5 channels, clean more",
                 "median " + _sites(names, flips, "noisy_median", lambda v: f"{v:g}") + " noisy vs "
                 + _sites(names, flips, "clean_median", lambda v: f"{v:g}") + " clean; AUROC of the count: "
                 + _sites(names, flips, "auroc", lambda v: f"{v:.3f}"),
                 f"`memloc flip {run} {ex} [--site weight]`",
                 verdict(flips[m, s]["auroc"] > 0.5 for m in names for s in SITES) + " (AUROC > 0.5)"])
    # 2. collateral
    rows.append(["Zeroing a noisy example's critical set costs less test accuracy than a clean one's (Fig. 7)",
                 "about 10 points less",
                 "test accuracy after zeroing, noisy / clean example's set: " + "; ".join(
                     f"{m} {s}: {pct(flips[m, s]['col_noisy'], 1)} / {pct(flips[m, s]['col_clean'], 1)}"
                     for m in names for s in SITES) + "; final test " + _per_model(
                     names, lambda m: pct(final[m].get("test_accuracy", np.nan), 1)),
                 f"`memloc flip {run} {ex} --collateral [--site weight]`",
                 _collateral_verdict([flips[m, s]["col_noisy"] - flips[m, s]["col_clean"] for m in names for s in SITES])])
    # 3. layers
    rows.append(["Critical units are spread over many layers, not the last ones (Fig. 6)",
                 "spread over layers; last layers not special",
                 "layers (parameters) holding >= 5% of the noisy examples' zeroed set, unit / weight site: "
                 + "; ".join(f"{m}: {flips[m, 'pre_norm']['layers_5pct']}/{flips[m, 'pre_norm']['n_layers']}, "
                             f"{flips[m, 'weight']['layers_5pct']}/{flips[m, 'weight']['n_layers']}" for m in names)
                 + "; share in the last layer: " + _sites(names, flips, "last_share", pct),
                 f"`memloc flip {run} {ex} [--site weight]` (layer_hist)",
                 verdict(flips[m, s]["layers_5pct"] >= 2 and flips[m, s]["last_share"] < 0.5
                         for m in names for s in SITES) + " (>= 2 layers with >= 5%, < 50% in the last)"])
    # 4. gradient cosine
    rows.append(["Clean and noisy gradients point in opposite directions: cosine mostly below -0.75 (Fig. 2)",
                 "mostly below -0.75 (ResNet-9, CIFAR-10)",
                 "median cosine over (epoch, layer) / share below -0.75: " + _per_model(
                     names, lambda m: "; BN train mode ".join(
                         f"{g['cos_median']:.2f} / {pct(g['cos_below'])}" for g in grad[m].values())),
                 f"`memloc gradients {run} [--bn-mode train --checkpoints 0-40:2]`",
                 verdict(g["cos_below"] > 0.5 for m in names for g in grad[m].values())
                 + " (more than half the cells below -0.75)"])
    # 5. learning phase
    rows.append(["Noisy examples are learned in a middle phase of training (epochs 10-30 of 50: 20-60%) (Fig. 2)",
                 "mostly between 20% and 60% of training",
                 "noisy learned for good at a median of " + _per_model(
                     names, lambda m: f"{pct(phase[m]['noisy_median'])} of {phase[m]['epochs']} epochs "
                                      f"({pct(phase[m]['noisy_middle'])} within 20-60%, clean median "
                                      f"{pct(phase[m]['clean_median'])})"),
                 "`memloc train` dynamics (`run.dynamics('correct')`)",
                 verdict(phase[m]["noisy_middle"] > 0.5 for m in names) + " (more than half within 20-60%)"])
    # 6. example-tied dropout
    if etd is not None:
        rows.append(["Example-tied dropout, drop mode: noisy labels left 0.1% / 1.4% / 3.1% (MNIST / SVHN / CIFAR-10)"
                     " at a clean cost of 0.8 / 4.2 / 9.2 points (Tab. 1)",
                     "MNIST: 0.1% left, -0.8 points clean",
                     f"lenet width 4 (p_gen 0.2, p_mem 0.1): {etd['drop_noisy']:.1f}% left (test mode {etd['test_noisy']:.1f}%), "
                     f"clean train accuracy {-etd['clean_cost']:+.1f} points, test {-etd['test_cost']:+.1f} points",
                     f"`memloc train ... --model lenet --width 4 --etd-after {ETD['etd_after']} --p-gen 0.2 --p-mem 0.1 && "
                     f"memloc dropout RUN`",
                     verdict([etd["drop_noisy"] <= 1.0, etd["clean_cost"] <= 2.0])
                     + " (<= 1% left and <= 2 points clean cost)"])
    lines = ["# The paper's claims on MNIST-5k (Maini et al., ICML 2023)", "",
             f"`python scripts/reproduce_paper.py {' '.join(sys.argv[1:])}`; runs in `{runs_dir}` "
             "(10% symmetric noise, 4,000 training / 1,000 test images; MLP 30 epochs, lenet and ResNet-9 width 16 "
             "40 epochs, SGD + momentum 0.9, weight decay 5e-4, one-cycle lr peak 0.05, batch 128, no augmentation; "
             "one seed). Unit site = memloc's default (`pre_norm`: a channel / feature); weight site = the "
             "authors' rule (`--site weight`: a conv filter or one element of any other parameter). Both sites "
             "use memloc's objective here (64 clean reference examples, no noise copies), so they differ only "
             "in what is zeroed; the MLP's paper-protocol search adds 5 noised copies and B = 512.", "",
             "| claim | paper | ours | command | verdict |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Runs and results in the runs folder are reused on a rerun: the total time below counts only "
              "what this invocation computed. Gradients of models with BatchNorm (resnet9) are also taken with "
              "BN in train mode (batch statistics, as during training) at every 2nd epoch.", "",
              "Per model and site (flip): " + "; ".join(
        f"{m} {s}: {flips[m, s]['searched']} searched, noisy {pct(flips[m, s]['noisy_flipped'])} / clean "
        f"{pct(flips[m, s]['clean_flipped'])} flipped within {args.max_units}, most zeroed in `{flips[m, s]['top_layer']}`"
        for m in names for s in SITES) + "."]
    return lines


if __name__ == "__main__":
    main()
