"""Attention heads as units of a language model: greedy zeroing and localisation by unit kind, on one run.

    python scripts/lm_heads.py          # reuses (or trains) runs/tinymem, writes artifacts/lm_heads.md

The run is scripts/tinymem_experiment.py's (memloc's TinyGPT, 2 blocks of 4 heads, width 64, TinyMem's
increment sequences, 10% noisy, 60 epochs; the same folder as the other LM scripts). ``memloc.flip``
searches every memorised target and a sample of reproduced clean sequences once per unit kind
(``units``): ``outputs`` (every linear layer's output features, flip's default, as
scripts/lm_zeroing.py), ``mlp`` (MLP hidden neurons), ``heads`` (attention heads: a head's slice of the
attention output before the output projection) and ``both``. Reported per kind: median zeroed units,
targets vs clean, the share broken by one unit and the AUROC of "fewer units = target". Then
``memloc.localise_neurons(units="heads")`` ranks the heads for each memorised target by the cheap
methods, and each method's top-ranked head (of all layers) is zeroed alone: the share of targets it
breaks, beside the share of clean sequences that the same heads break. One thread.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import finish, flip_search_arguments, invocation, machine  # noqa: E402
from tinymem_experiment import CONFIG  # noqa: E402

import memloc  # noqa: E402
from memloc.core.lm import lm_logits, suffix_measures  # noqa: E402
from memloc.core.neurons import neuron_masks, unit_layers  # noqa: E402

METHODS = "zero_out,activations,grad_x_act,greedy,random"


def breaks(model, layers, tokens, p, s, flat_unit) -> np.ndarray:
    """(N,) bool: the suffix of each row of ``tokens`` is no longer reproduced with unit ``flat_unit[i]``
    (a global head id) zeroed for row i."""
    masks = torch.ones(len(tokens), len(layers) * layers[0].size)
    masks[torch.arange(len(tokens)), torch.as_tensor(flat_unit)] = 0
    with torch.no_grad(), neuron_masks(model, layers, masks.view(len(tokens), len(layers), layers[0].size)):
        memorised = suffix_measures(lm_logits(model, tokens[:, :p + s - 1]), tokens, p, s)[2]
    return ~memorised.numpy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    flip_search_arguments(p, out="artifacts/lm_heads.md")
    p.add_argument("--units", default="heads,mlp,both,outputs", help="unit kinds to search, comma-separated")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    load_before = os.getloadavg()
    run = memloc.train(args.run, CONFIG, device=args.device, resume=True)
    trained = time.time() - started
    data = run.data()
    from sklearn.metrics import roc_auc_score

    rows = ["| units | count | targets searched | clean searched | median units, targets | median units, clean "
            "| broken by one unit, targets | broken by one unit, clean | broken within the cap (all) | AUROC | flip s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for units in args.units.split(","):
        t = time.perf_counter()
        res = memloc.flip(run, examples={"noisy": "all", "clean": args.clean}, max_units=args.max_units,
                          ref_batch_size=args.ref_batch_size, seed=args.seed, units=units, device=args.device,
                          resume=None)
        seconds = time.perf_counter() - t
        searched = res["status"].values == 0
        target = res["is_noisy"].values.astype(bool)
        count = res["neuron_count"].values
        n_units = int(res["layer_size"].values.sum())
        cap = min(args.max_units, n_units)
        tg, cl = searched & target, searched & ~target
        auc = float(roc_auc_score(target[searched], -count[searched])) if tg.any() and cl.any() else float("nan")
        is_head = np.isin(res["layer"].values, [layer.name for layer in unit_layers(run.model(device="cpu"), "heads")])
        hist = res["layer_hist"].values[searched].sum((0, 1))
        summary[units] = (np.median(count[tg]), np.median(count[cl]), auc, float((count[cl] == 1).mean()),
                          float(hist[is_head].sum() / max(1, hist.sum())))
        rows.append(f"| `{units}` | {n_units} | {int(tg.sum())} | {int(cl.sum())} | {np.median(count[tg]):g} | "
                    f"{np.median(count[cl]):g} | {100 * (count[tg] == 1).mean():.0f}% | {100 * (count[cl] == 1).mean():.0f}% | "
                    f"{100 * res['flipped'].values[searched].mean():.0f}% (cap {cap}) | {auc:.3f} | {seconds:.0f} |")

    # localisation on heads: each method's top head, zeroed alone
    t = time.perf_counter()
    loc = memloc.localise_neurons(run, units="heads", methods=METHODS, ref_batch_size=8, seed=args.seed,
                                  device=args.device)
    t_loc = time.perf_counter() - t
    model = run.model(device="cpu")
    layers = unit_layers(model, "heads")
    pl, sl = data.prefix_len, data.suffix_len
    where = {int(i): r for r, i in enumerate(data.ids)}
    targets = data.tokens[torch.as_tensor([where[int(i)] for i in loc["target"].values])]
    memorised = suffix_measures(lm_logits(model, data.tokens[:, :pl + sl - 1]).detach(), data.tokens, pl, sl)[2].numpy()
    clean = data.tokens[torch.as_tensor(np.flatnonzero(memorised & ~data.is_memorised_target))]
    score = loc["score"].values                       # (method, target, layer, head)
    loc_rows = ["| method | seconds (all targets) | targets broken by zeroing its top head | clean sequences broken by "
                "the same head (mean over targets) | most frequent top head |", "|---|---:|---:|---:|---|"]
    names = [f"{name.rsplit('.', 2)[0]} head {k}" for name in loc["layer"].values for k in range(layers[0].size)]
    found = {}
    for i, method in enumerate(loc["method"].values):
        top = score[i].reshape(len(targets), -1).argmax(1)
        broke = breaks(model, layers, targets, pl, sl, top)
        collateral = (np.mean([breaks(model, layers, clean, pl, sl, np.full(len(clean), j)).mean() for j in top])
                      if len(clean) else float("nan"))
        found[str(method)] = (float(broke.mean()), float(collateral))
        values, counts = np.unique(top, return_counts=True)
        loc_rows.append(f"| {method} | {float(loc['seconds'].values[i]):.2f} | {100 * broke.mean():.0f}% | "
                        f"{100 * collateral:.0f}% | {names[int(values[counts.argmax()])]} ({counts.max()} of {len(top)}) |")
    # INJ on heads: one random head per layer fine-tuned per sequence; each method's recall of it
    t = time.perf_counter()
    inj = memloc.inj_benchmark(run, units="heads", n_sequences=8, n_injected=1, seed=args.seed, device=args.device)
    t_inj = time.perf_counter() - t
    injected = int(inj["injected_ok"].values.sum())
    recall = inj["recall"].mean(("sequence", "layer")).to_pandas().sort_values(ascending=False)
    per_seq = inj["seconds"].mean("sequence").to_pandas()
    inj_rows = ["| method | recall of the injected head | seconds / sequence |", "|---|---:|---:|",
                *(f"| {m} | {r:.2f} | {per_seq[m]:.2f} |" for m, r in recall.items())]
    load_after = os.getloadavg()

    cmd = invocation(__file__, argv)
    settings = ", ".join(f"{k}={v}" for k, v in CONFIG.items())
    heads = summary.get("heads")
    lines = [
        f"`{cmd}`", "",
        "# Attention heads as units: greedy zeroing and localisation by unit kind", "",
        f"memloc {memloc.__version__}; {machine(args.device)}. Machine load (1-minute load average, 2 cores shared "
        f"with other jobs): {load_before[0]:.1f} before, {load_after[0]:.1f} after; read the seconds to one digit. "
        f"Wall time: training {trained:.0f} s (reading the run when it was reused).", "",
        f"Run: `{args.run}` = scripts/tinymem_experiment.py's ({settings}); {int(run.is_noisy.sum())} of "
        f"{run.num_train} training sequences are targets, prefix {pl} and suffix {sl} tokens. Flip per unit kind "
        f"(`memloc flip {args.run} --examples noisy:all,clean:{args.clean} --max-units {args.max_units} "
        f"--ref-batch-size {args.ref_batch_size} --seed {args.seed} --units UNITS`), site pre_norm, float32. "
        "A head is its slice of the attention output before the output projection (head_dim "
        f"{layers[0].group} features zeroed together); an MLP neuron an input feature of the down-projection; `outputs` are the output "
        "features of every linear layer but the head (scripts/lm_zeroing.py's units). Not broken within the cap "
        "counts as cap + 1.", "",
        *rows, "",
        "## Which head: localisation on heads", "",
        f"`memloc localise-neurons {args.run} --units heads --methods {METHODS} --ref-batch-size 8` "
        f"({loc.sizes['target']} memorised targets, {t_loc:.0f} s). Each method's top-ranked head over both blocks "
        f"is zeroed alone for its target; the same head is zeroed for every one of the {len(clean)} clean "
        "sequences the model reproduces (collateral).", "",
        *loc_rows, "",
    ]
    lines += ["## INJ on heads: the known answer", "",
              f"`memloc.inj_benchmark({args.run!r}, units='heads', n_sequences=8, n_injected=1, seed={args.seed})`: "
              f"{injected} of 8 sequences injected, each into one random head per layer (its {layers[0].group} output-projection columns "
              f"fine-tuned, every other weight unchanged); recall = the share of layers whose top-ranked head is the "
              f"injected one (random: 1/{layers[0].size}); {t_inj:.0f} s in all. Greedy at its default carries on to one "
              "head per layer.", "", *inj_rows, ""]
    mlp = summary.get("mlp")
    if heads is not None:
        lines.append(f"Targets vs clean on heads: median {heads[0]:g} vs {heads[1]:g} zeroed heads, AUROC {heads[2]:.3f} "
                     "of \"fewer heads = target\" (Maini et al.'s unit-count finding, here with heads as the units); "
                     f"one head alone breaks {100 * heads[3]:.0f}% of the reproduced clean sequences searched.")
    if heads is not None and mlp is not None:
        better = "MLP neurons" if mlp[2] > heads[2] else "Heads"
        lines.append(f"On MLP neurons: median {mlp[0]:g} vs {mlp[1]:g}, AUROC {mlp[2]:.3f}. {better} tell "
                     f"memorised targets from clean sequences better on this run; with {sum(layer.size for layer in layers)} "
                     f"heads of {layers[0].group} features each, a head is a coarse unit.")
    both = summary.get("both")
    if both is not None and heads is not None and mlp is not None:
        near = "heads" if abs(both[2] - heads[2]) < abs(both[2] - mlp[2]) else "mlp"
        lines.append(f"With both kinds searched together, AUROC {both[2]:.3f}, closer to `{near}`'s: "
                     f"{100 * both[4]:.0f}% of the units those searches zeroed are heads.")
    best = [m for m, (b, _) in found.items() if m != "random" and b >= 0.9]
    if best:
        m = min(best, key=lambda k: found[k][1])
        lines.append(f"Of the methods whose top head breaks at least 90% of the targets, {m} picks the most specific "
                     f"head: it breaks {100 * found[m][0]:.0f}% of the targets and {100 * found[m][1]:.0f}% of the clean "
                     f"sequences (random heads: {100 * found['random'][0]:.0f}% and {100 * found['random'][1]:.0f}%).")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    finish(lines, started, args.out)


if __name__ == "__main__":
    main()
