"""DEL, MemPi's natural-memorisation benchmark of neuron localisation, on the TinyGPT TinyMem run (issue 24).

    python scripts/lm_del.py   # trains (or reuses) runs/lm_benchmark/{gpt,hf_gpt2}_del, writes artifacts/lm_del.md

The runs are scripts/lm_benchmark.py's TinyGPT and GPT-2-config runs trained for 60 epochs instead of 10 (at 10
the TinyGPT has memorised 1 of its 51 noisy sequences). Its targets are the noisy
TinyMem sequences it memorised by itself (greedy decoding reproduces their suffix); every localisation
method scores the MLP neurons for each (memloc.del_benchmark), the top fraction of every layer's neurons
is zeroed, and the table reports, per method and fraction: the share of targets no longer reproduced,
the mean drop of their suffix accuracy, the share of the OTHER memorised targets still reproduced
(specificity), the change of the held-out (test) suffix loss and token accuracy, and the localisation
seconds per target (one thread).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import finish, invocation, machine  # noqa: E402
from lm_benchmark import MODELS, RUN, ensure_run  # noqa: E402

import memloc  # noqa: E402
from memloc.analyses.localise import METHODS, neuron_scores  # noqa: E402

#: scripts/lm_benchmark.py's runs trained longer: at its 10 epochs it reproduces 1 of its 51 noisy sequences
DEL_RUN = {**RUN, "epochs": 60}
#: the benchmark's settings (memloc.del_benchmark): MemPi's 0.1 / 0.5 / 1% and two larger shares (on 256
#: neurons a layer 0.1% and 0.5% both round up to one neuron)
DEL = dict(fractions=(0.001, 0.005, 0.01, 0.02, 0.05), examples="memorised:16", seed=0)
#: MemPi's DEL finding (Chang et al., NAACL 2024, arXiv 2311.09060) in its abstract's words; the paper's DEL
#: table was not at hand, so no figure of it is quoted
MEMPI = ("its abstract: the two benchmarks (INJ and DEL) rank the five methods consistently, the methods adapted "
         "from network pruning (Slimming, Hard Concrete) perform well on both, all show promising localisation, "
         "and even successful methods identify neurons that are not specific to a single memorised sequence. "
         "(The paper's DEL figures are not quoted: its table was not at hand to check them.)")

DIFFERENCES = [
    "- Models and data: a 2-layer TinyGPT and GPT-2 config (256 MLP neurons a layer) trained for under a minute on TinyMem's arithmetic "
    "sequences, whose targets are its noisy sequences memorised within the run (MemPi: memorised pretraining "
    "sequences of GPT-2 / Pythia found by extraction).",
    "- Measures: exact greedy reproduction of the 6-token suffix and its token accuracy, on the target and on the "
    "other memorised targets, and the held-out suffix loss / token accuracy; MemPi measures the accuracy (and "
    "Levenshtein distance) of the target's continuation and the same on other sequences.",
    "- Neurons: the top fraction of each layer, at least one; on 256 neurons 0.1% and 0.5% are both one neuron "
    "per layer.",
    "- Time: one CPU thread, all methods at memloc's defaults (MemPi's GPT-2 settings for Slimming / Hard "
    "Concrete / IG); at most the first 16 memorised targets.",
]


def table(res) -> list[str]:
    lines = ["| method | share of neurons (per layer) | targets deleted | suffix accuracy drop | other memorised "
             "kept (specificity) | test loss change | test accuracy change (points) | ms / target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    acc0 = res["accuracy_before"].values
    tl0, ta0 = float(res["test_loss_before"]), float(res["test_accuracy_before"])
    for a, method in enumerate(res["method"].values):
        for b, frac in enumerate(res["fraction"].values):
            mem = res["memorised"].values[a, b]
            lines.append(f"| {method} | {frac:.1%} ({int(res['zeroed'].values[b])}) | {1 - mem.mean():.2f} | "
                         f"{np.mean(acc0 - res['accuracy'].values[a, b]):.2f} | "
                         f"{np.nanmean(res['kept'].values[a, b]):.2f} | "
                         f"{np.mean(res['test_loss'].values[a, b]) - tl0:+.3f} | "
                         f"{100 * (np.mean(res['test_accuracy'].values[a, b]) - ta0):+.1f} | "
                         f"{1e3 * float(res['seconds'].values[a]):.1f} |")
    return lines


def ranking(res) -> list[str]:
    """One line per fraction: the methods by the share of targets deleted (then by specificity)."""
    lines = []
    for b, frac in enumerate(res["fraction"].values):
        deleted = 1 - res["memorised"].values[:, b].mean(1)
        kept = np.nanmean(res["kept"].values[:, b], axis=1)
        order = sorted(range(len(deleted)), key=lambda a: (-deleted[a], -kept[a]))
        lines.append(f"- {frac:.1%} ({int(res['zeroed'].values[b])} per layer): " + " > ".join(
            f"{res['method'].values[a]} {deleted[a]:.2f} / {kept[a]:.2f}" for a in order))
    return lines


def section(name: str, device: str, runs_dir: Path) -> tuple[list[str], list[str]]:
    """(the model's table with its heading, its ranking lines) for run ``name`` (a lm_benchmark model)."""
    run, trained = ensure_run(runs_dir / f"{name.replace(':', '_')}_del", name, device, DEL_RUN)
    model = run.model(device=device)
    warm = torch.randint(0, 10, (1, 18))         # imports (captum) and first calls are not charged to any method
    neuron_scores(model, warm, 12, 6, options={"slimming": {"max_steps": 10}, "hard_concrete": {"max_steps": 10}})
    res = memloc.del_benchmark(run, methods=METHODS, device=device, **DEL)
    data = run.data()
    n_mem = len(res.config["memorised"])
    head = [f"### {MODELS[name]} (`{name}`): {res.config['n_layers']} MLP layers x {res.config['d_mlp']} neurons", "",
            (f"Training took {trained:.0f} s. " if trained is not None else "")
            + f"The run reproduces {n_mem} of its {int(data.is_memorised_target.sum())} noisy (memorisation-target) "
            f"sequences exactly; the first {res.sizes['target']} are the targets, the other {n_mem - 1} memorised "
            f"ones measure specificity for each. Held-out: {len(data.test_tokens)} test sequences, suffix loss "
            f"{float(res['test_loss_before']):.3f}, token accuracy {float(res['test_accuracy_before']):.1%} before "
            "zeroing.", "", *table(res), ""]
    return head, [f"{MODELS[name]}:", "", *ranking(res), ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs/lm_benchmark", help="where the runs are written (and reused)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--markdown", default="artifacts/lm_del.md", help="write the tables here")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    command = invocation(__file__, argv)
    tables, rankings = [], []
    for name in args.models.split(","):
        table_lines, ranking_lines = section(name, args.device, Path(args.runs_dir))
        tables += table_lines
        rankings += ranking_lines
    lines = [f"`{command}`", "", "# Neuron localisation in language models: DEL (natural memorisation)", "",
             f"memloc {memloc.__version__}; {machine(args.device)}.", "",
             "Settings: runs (scripts/lm_benchmark.py's, 60 epochs instead of 10) "
             + ", ".join(f"{k}={v}" for k, v in DEL_RUN.items())
             + "; DEL " + ", ".join(f"{k}={v}" for k, v in DEL.items()) + "; every method at memloc's defaults.", "",
             "Per target, each method's top neurons of every layer are zeroed (only that target's); columns are "
             "means over the targets: the share no longer reproduced exactly, the drop of its suffix token "
             "accuracy, the share of the other memorised sequences still reproduced, and the held-out changes. "
             "Numbers are exact for these seeds; seconds are wall-clock on a shared machine.", "", *tables,
             "## Beside MemPi", "", f"MemPi (Chang et al., NAACL 2024) on DEL, {MEMPI}.", "",
             "Ours, by the share of targets deleted / the share of other memorised sequences kept:", "",
             *rankings, "## What differs from MemPi's setting", "", *DIFFERENCES]
    finish(lines, started, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
