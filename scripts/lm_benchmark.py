"""INJ, MemPi's known-answer benchmark of neuron localisation, on a TinyGPT and a GPT-2-config model (issue 24).

    python scripts/lm_benchmark.py            # trains runs/lm_benchmark/{gpt,hf_gpt2}, writes artifacts/lm_localisation.md

For each model: a short TinyMem run (memloc.train; the run directory every memloc analysis reads),
then :func:`memloc.inj_benchmark`: new random sequences, each injected into the output weights of
``n_injected`` random MLP neurons per layer until greedy decoding reproduces its suffix, and every
localisation method's top-k recall of those neurons per layer (k = ``n_injected``), with its seconds
per sequence, measured side by side in one process (one thread) beside a raw forward+backward of the
same model on one sequence. memloc's greedy zeroing runs in four forms on the same sequences and
neurons (same seed): with and without a reference of 8 clean training sequences whose loss it keeps
low, each carried on past the break until it has zeroed n_injected x layers neurons itself (its
default, ``min_zeroed="auto"``) or stopping when the suffix breaks (``min_zeroed=0``: the rest of its
ranking is the gradient x activation estimate at that point). Also writes a figure of recall against
time (as a multiple of Hard Concrete's) beside the Markdown file.
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
from _markdown import finish, invocation, machine  # noqa: E402

import memloc  # noqa: E402
from memloc.analyses.localise import METHODS, neuron_scores  # noqa: E402
from memloc.core.lm import lm_logits, suffix_measures  # noqa: E402
from memloc.core.neurons import mlp_layers  # noqa: E402

#: the runs' settings (memloc.train config); sized for a few minutes on one CPU core
RUN = dict(
    dataset="tinymem:increment", n_layer=2, d_model=64, n_head=4,   # MLP: 2 layers of 256 neurons
    n_train=512, n_test=64, seq_len=24, noise=0.1,
    epochs=10, batch_size=32, optimizer="adam", lr=3e-3, weight_decay=0.0,
    schedule="constant",     # warm-up + cosine leaves the GPT-2 config at 30% held-out token accuracy in 10 epochs
)
#: the benchmark's settings (memloc.inj_benchmark)
INJ = dict(
    n_sequences=8,           # new random sequences (tokens drawn from those the corpus uses)
    n_injected=4,            # neurons per layer (1.6% of 256; MemPi: 0.1% or 1% of all neurons)
    prefix_len=12, suffix_len=6,
    lr=0.05, max_steps=500,  # Adam on the chosen output weights; MemPi's INJ lr at 0.1% is 0.05
    seed=0,
)
MODELS = {"gpt": "TinyGPT", "hf:gpt2": "HF GPT-2 config"}
#: MemPi's published INJ finding (Chang et al., NAACL 2024), as the issue states it
MEMPI = ("Hard Concrete and Slimming best; IG, Activations and Zero-Out behind; every method above random "
         "(GPT-2, GPT-2 XL, Pythia 2.8B / 6.9B, GPT-J; 0.1% and 1% of the neurons injected)")


DIFFERENCES = [
    "- Models: 2-layer models of width 64 (512 MLP neurons) trained for minutes on TinyMem's arithmetic "
    "sequences, not pretrained GPT-2 / Pythia / GPT-J; the injected sequences are random token strings over the "
    "corpus's symbols, not new-entity definitions (ECBD).",
    "- Injection: a fixed count of neurons per layer (MemPi: a random 0.1% or 1% of all neurons), fine-tuned on "
    "the suffix loss given the prefix until greedy decoding reproduces the suffix (MemPi: the whole sequence's "
    "loss below 0.05); so the injected memory is just strong enough, and one zeroed neuron breaks it.",
    "- Methods: the suffix loss replaces the whole-sequence loss in every method; IG integrates one whole layer's "
    "activations at once (MemPi: one position at a time, the target token's probability); Slimming and Hard "
    "Concrete keep MemPi's GPT-2 hyper-parameters (not re-tuned on dev sequences as MemPi did for each model), "
    "whose penalty is a mean over all neurons, so on 512 neurons it weighs each mask far more than on GPT-2's "
    "36,864.",
    "- Time: every method on one CPU thread, one sequence at a time; MemPi ran on GPUs.",
]


def ensure_run(path: Path, model: str, device: str, cfg: dict = RUN):
    """The run of ``cfg`` with ``model`` at ``path``, reused when it is finished; ``(run, seconds trained or None)``."""
    if (path / "run.json").is_file():
        run = memloc.load(path)
        if run.config.get("model") == model and run.epochs and run.epochs[-1] == cfg["epochs"]:
            return run, None
    start = time.perf_counter()
    run = memloc.train(path, {**cfg, "model": model}, device=device, resume=(path / "run.json").is_file())
    return run, time.perf_counter() - start


def variants() -> list[tuple[str, dict, int]]:
    """memloc's greedy zeroing beside its default (which keeps 8 clean sequences' loss low and carries on
    until n_injected x layers neurons are zeroed): (label, options, ref_batch_size)."""
    stop = {"greedy": {"min_zeroed": 0}}
    return [("greedy, no reference", {}, 0),
            ("greedy, stops at the break", stop, 8),
            ("greedy, stops at the break, no reference", stop, 0)]


def raw_step_seconds(model, tokens, p, s, repeats: int = 20) -> float:
    """Seconds of one forward + backward of ``model`` on one sequence (the unit the costs are counted in)."""
    x = tokens[:1]
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        loss = suffix_measures(lm_logits(model, x[:, :-1]), x, p, s)[0].sum()
        torch.autograd.grad(loss, [q for q in model.parameters() if q.requires_grad])
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def mean_se(v) -> str:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return f"{v.mean():.2f} +- {v.std(ddof=1) / np.sqrt(len(v)):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def benchmark(name: str, run, device: str) -> tuple[list[str], dict]:
    model = run.model(device=device)
    layers = mlp_layers(model)
    n_layers, d = len(layers), layers[0].size
    # warm-up: imports (captum) and first calls are not charged to any method
    warm = torch.randint(0, 10, (1, INJ["prefix_len"] + INJ["suffix_len"]))
    neuron_scores(model, warm, INJ["prefix_len"], INJ["suffix_len"],
                  options={"slimming": {"max_steps": 10}, "hard_concrete": {"max_steps": 10}})
    raw = raw_step_seconds(model, warm.to(next(model.parameters()).device), INJ["prefix_len"], INJ["suffix_len"])
    res = memloc.inj_benchmark(run, methods=METHODS, device=device, **INJ)
    ok = res["injected_ok"].values
    recall = {str(m): res["recall"].values[i][ok] for i, m in enumerate(res["method"].values)}   # (seq, layer)
    seconds = {str(m): res["seconds"].values[i][ok] for i, m in enumerate(res["method"].values)}
    for label, options, ref in variants():      # the same sequences and neurons (same seed)
        other = memloc.inj_benchmark(run, methods="greedy", options=options, ref_batch_size=ref, device=device, **INJ)
        assert np.array_equal(res["injected"].values, other["injected"].values)
        recall[label], seconds[label] = other["recall"].values[0][ok], other["seconds"].values[0][ok]
    hc = float(np.mean(seconds["hard_concrete"]))
    carried = res.config["options"]["greedy"]["min_zeroed"]
    lines = [f"### {MODELS[name]} (`{name}`): {n_layers} MLP layers x {d} neurons, "
             f"final test token accuracy {run.metrics()['test_accuracy'][-1]:.1%}", "",
             f"{int(ok.sum())} of {len(ok)} sequences injected (fine-tuning steps: median "
             f"{int(np.median(res['inject_steps'].values[ok]))}, {np.mean(res['inject_seconds'].values[ok]):.2f} s "
             f"per sequence); greedy broke each injected suffix after zeroing a median of "
             f"{np.median(res['greedy_zeroed'].values[ok]):g} neuron(s) (max "
             f"{int(res['greedy_zeroed'].values[ok].max())}) and, by default, carried on until it had zeroed "
             f"{carried}. One forward+backward of the model on one sequence: {raw * 1e3:.1f} ms.", "",
             "| method | recall (mean +- s.e. over sequences) | " + " | ".join(f"layer {i}" for i in range(n_layers))
             + " | seconds / sequence | x forward+backward | x Hard Concrete's time |",
             "|---|---:|" + "---:|" * n_layers + "---:|---:|---:|"]
    for m in recall:
        r, t = recall[m], float(np.mean(seconds[m]))
        lines.append(f"| {m} | {mean_se(r.mean(1))} | " + " | ".join(f"{v:.2f}" for v in r.mean(0))
                     + f" | {t:.3f} | {t / raw:.1f} | {t / hc:.3f} |")
    lines.append("")
    lines.append(f"Random baseline's expected recall: k / d = {INJ['n_injected'] / d:.3f}.")
    summary = {m: (float(np.mean(recall[m])), float(np.mean(seconds[m])), float(np.std(recall[m].mean(1), ddof=1)
                                                                                / np.sqrt(len(recall[m]))))
               for m in recall}
    return lines, summary


def plot(summaries: dict, path: Path) -> None:
    """Recall against seconds per sequence as a multiple of Hard Concrete's, one panel per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 4), squeeze=False)
    points = []
    for ax, (name, summary) in zip(axes[0], summaries.items()):
        hc = summary["hard_concrete"][1]
        for m, (r, t, se) in summary.items():
            if m == "random":
                continue
            color = "tab:red" if m.startswith("greedy") else "tab:gray" if m != "hard_concrete" else "tab:blue"
            ax.errorbar(t / hc, r, yerr=se, fmt="o", color=color, capsize=2)
            points.append((ax, m, (t / hc, r)))
        ax.axhline(summary["hard_concrete"][0], color="tab:blue", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel="seconds per sequence / Hard Concrete's (same run)",
               ylabel="recall of the injected neurons",
               title=f"INJ, {MODELS[name]} (random: {summary['random'][0]:.2f})")
    fig.tight_layout()
    _labels(fig, points)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _labels(fig, points) -> None:
    """Label each point beside it, on the first side (above right, below right, above left, below left)
    where the label stays inside its panel and overlaps no label already placed there."""
    renderer = fig.canvas.get_renderer()
    placed = {}
    for ax, text, xy in points:
        for dx, dy, ha, va in ((3, 3, "left", "bottom"), (3, -3, "left", "top"), (-3, 3, "right", "bottom"),
                               (-3, -3, "right", "top")):
            label = ax.annotate(text, xy, fontsize=7, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va)
            box, frame = label.get_window_extent(renderer), ax.get_window_extent(renderer)
            if frame.x0 <= box.x0 and box.x1 <= frame.x1 and not any(box.overlaps(o) for o in placed.get(ax, [])):
                break
            label.remove()
        else:
            label = ax.annotate(text, xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        placed.setdefault(ax, []).append(label.get_window_extent(renderer))


#: cost growth: widths (d_model; d_mlp = 4 d_model) of a random TinyGPT, and target counts on the TinyGPT run
WIDTHS, COUNTS = (32, 64, 128), (1, 4, 16)
#: greedy carried on to 8 zeroed neurons, so that its cost does not depend on whether a target is memorised
COST_OPTIONS = {"greedy": {"min_zeroed": 8}}


def cost_row(label: str, model, x, reference, raw: float) -> str:
    got = neuron_scores(model, x, INJ["prefix_len"], INJ["suffix_len"], reference=reference, options=COST_OPTIONS)
    per = {m: got["seconds"][m] / len(x) for m in METHODS}
    return f"| {label} | {raw * 1e3:.1f} | " + " | ".join(f"{per[m]:.3f} ({per[m] / raw:.0f})" for m in METHODS) + " |"


def cost_growth(run, device: str) -> list[str]:
    """Seconds per target of every method (in brackets: x one forward+backward on one sequence) as the
    MLP widens (random TinyGPTs, one target) and as targets are localised together (the TinyGPT run)."""
    span = INJ["prefix_len"] + INJ["suffix_len"]
    g = torch.Generator().manual_seed(0)
    head = ("| {} | forward+backward (ms) | " + " | ".join(METHODS) + " |", "|---:|---:|" + "---:|" * len(METHODS))
    lines = ["## How the costs grow", "", "Seconds per target sequence (in brackets: multiples of one forward+backward "
             "of the model on one sequence), every method at its defaults but greedy carried on to 8 zeroed neurons "
             "(so that its cost does not hang on whether the target is memorised), with a reference of 8 "
             "sequences.", "", "By MLP width (a random TinyGPT of 2 layers, d_mlp = 4 d_model, one random target):",
             "", head[0].format("d_mlp"), head[1]]
    for i, width in enumerate((WIDTHS[0],) + WIDTHS):   # the first one warms up (imports, first calls)
        model = memloc.TinyGPT(14, n_layer=2, n_head=4, d_model=width, max_len=32, seed=0).to(device)
        x = torch.randint(0, 13, (9, span), generator=g).to(device)
        row = cost_row(str(4 * width), model, x[:1], x[1:], raw_step_seconds(model, x, *span_of()))
        lines += [row] if i else []
    model, data = run.model(device=device), run.data()
    reference = data.tokens[-8:].to(device)
    raw = raw_step_seconds(model, data.tokens.to(device), *span_of())
    lines += ["", "By the number of targets localised in one call (the TinyGPT run, d_mlp = 256; its first training "
              "sequences as targets): zero_out and ig work target by target, the others batch the targets.", "",
              head[0].format("targets"), head[1]]
    for count in COUNTS:
        lines.append(cost_row(str(count), model, data.tokens[:count].to(device), reference, raw))
    return lines


def commit() -> str:
    """The checkout's short commit (with ``+changes`` when its tracked files differ from it)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def span_of() -> tuple[int, int]:
    return INJ["prefix_len"], INJ["suffix_len"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs/lm_benchmark", help="where the runs are written (and reused)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--markdown", default="artifacts/lm_localisation.md", help="write the tables here")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    command = invocation(__file__, argv)
    lines = [f"`{command}`", "", "# Neuron localisation in language models: INJ (known answer)", "",
             f"memloc {memloc.__version__} at commit {commit()}; {machine(args.device)}; load average (1 min) "
             f"{os.getloadavg()[0]:.1f} at the start.", "",
             "Settings: runs " + ", ".join(f"{k}={v}" for k, v in RUN.items()) + "; INJ "
             + ", ".join(f"{k}={v}" for k, v in INJ.items()) + "; every method at memloc's defaults "
             "(memloc.analyses.localise.HYPER: MemPi's GPT-2 settings for Slimming, Hard Concrete and IG).", "",
             "Recall: the share of the injected neurons of a layer among a method's top-k neurons of that "
             "layer (k = neurons injected per layer), averaged over layers, then over sequences. Recalls are "
             "exact for these seeds (a rerun gives the same); seconds are wall-clock on a shared machine and vary "
             "between reruns, so read the ratios to one digit.", ""]
    summaries, tables = {}, []
    for name in args.models.split(","):
        run, trained = ensure_run(Path(args.runs_dir) / name.replace(":", "_"), name, args.device)
        if trained is not None:
            lines.append(f"Training `{name}` took {trained:.0f} s.")
        table, summaries[name] = benchmark(name, run, args.device)
        tables += table + [""]
    lines += [""] + tables
    lines += ["## Beside MemPi", "", f"MemPi (Chang et al., NAACL 2024) on INJ: {MEMPI}.", ""]
    for name, summary in summaries.items():
        order = sorted(summary, key=lambda m: -summary[m][0])
        hc_recall, hc_time, _ = summary["hard_concrete"]
        greedy = [m for m in summary if m.startswith("greedy")]
        lines.append(f"- {MODELS[name]}: by recall " + " > ".join(f"{m} {summary[m][0]:.2f}" for m in order) + ".")
        for g in greedy:
            verdict = "reaches" if summary[g][0] >= hc_recall else "does not reach"
            lines.append(f"  {g} {verdict} Hard Concrete's recall ({summary[g][0]:.2f} vs {hc_recall:.2f}) in "
                         f"{summary[g][1] / hc_time:.1%} of its time.")
    lines += ["", "**The issue's goal** (memloc's gradient-guided zeroing reaches at least Hard Concrete's recall at a "
              "fraction of its time), for greedy at its defaults:"]
    for name, summary in summaries.items():
        (r, t, _), (hc_r, hc_t, _) = summary["greedy"], summary["hard_concrete"]
        met = "met" if r >= hc_r and t < hc_t else "not met"
        lines.append(f"- {MODELS[name]}: {met}: recall {r:.2f} vs Hard Concrete's {hc_r:.2f}, in {t / hc_t:.2f}x its "
                     f"time ({t:.3f} vs {hc_t:.3f} s per sequence, measured in this run).")
    figure = Path(args.markdown).with_suffix(".png")
    plot(summaries, figure)
    lines += ["", f"![recall against time]({figure.name})", "",
              "Recall (mean +- s.e. over sequences) against seconds per sequence as a multiple of Hard Concrete's "
              "(dashed: Hard Concrete's recall); red: greedy's forms."]
    if "gpt" in args.models.split(","):
        lines += [""] + cost_growth(memloc.load(Path(args.runs_dir) / "gpt"), args.device)
    lines += ["", "## What differs from MemPi's setting", "", *DIFFERENCES]
    lines += ["", f"Load average (1 min) {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores shared with "
              "other work."]
    finish(lines, started, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
