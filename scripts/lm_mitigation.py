"""Mitigation after TinyMem: remove ALL memorised sequences of the TinyGPT TinyMem run at once (issue 24 item 4).

    python scripts/lm_mitigation.py   # trains (or reuses) runs/lm_benchmark/{gpt,hf_gpt2}_mitigation, writes artifacts/lm_mitigation.md

The runs are scripts/lm_benchmark.py's 2-layer TinyGPT and GPT-2 config on TinyMem's increment sequences
trained for 150 epochs (at lm_del.py's 60 it reproduces 27% of its noisy sequences; TinyMem's 2-layer model 96%).
memloc.mitigate runs every method on a fresh copy of the final model, at each fraction (the share of
neurons per layer, or of MLP weights, a method may change; fine-tuning once), and measures the share
of noisy (memorisation-target) sequences still reproduced, of the clean training sequences, and the
held-out suffix loss, token accuracy and rule accuracy, before and after, with each method's seconds
(one CPU thread), beside TinyMem's published 2-layer math-model figures. In the same run, memloc's own
ways of removing them: memloc.unlearn (fine-tuning on the clean sequences, gradient ascent on the targets,
fine-tuning protected by EWC / MAS / LwF; at its defaults and at a 3x learning rate; ascent also at 10x and 33x) and memloc.retrain
(one layer reset and retrained alone on the clean sequences, for five layers named before looking).
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
from memloc.analyses.localise import neuron_scores  # noqa: E402
from memloc.analyses.mitigation import METHODS  # noqa: E402
from memloc.core.units import trace  # noqa: E402

#: scripts/lm_benchmark.py's TinyGPT run, trained for 150 epochs
MIT_RUN = {**RUN, "epochs": 150}
#: the benchmark's settings (memloc.mitigate; every method at memloc's defaults)
MITIGATE = dict(fractions=(0.01, 0.05, 0.1), ref_batch_size=64, seed=0)
#: TinyMem's published 2-layer math-model figures (Sakarvadia et al., ICLR 2025), as the issue quotes them:
#: share of noisy sequences left memorised, and test accuracy after (None: not quoted)
TINYMEM = {"balanced_subnet": ("0.0% (from 96.0%)", "97.24% (from 97.26%), ~30 s"), "subnet": ("1.5%", "71.8%"),
           "ig": ("0%", "90.1%"), "hard_concrete": ("32%", None), "greedy": ("72% (their weight-level greedy)", None),
           "zero_out": ("94%", None)}
#: memloc's goal (issue 24): at most this share of targets left at no more than this many points of accuracy lost
GOAL = (0.01, 0.1)
OURS = "greedy_weights"
#: memloc.unlearn's methods in the table, and its settings (suffix: (methods, options)): its defaults, a 3x
#: learning rate, and ascent alone at 10x and 33x its default learning rate
UNLEARN = ("finetune", "ascent", "ewc", "mas", "lwf")
UNLEARN_SETTINGS = {"": (UNLEARN, {}), "@3x": (UNLEARN, {"lr": 0.03, "ascent_lr": 0.009}),
                    "@lr0.03": (("ascent",), {"ascent_lr": 0.03}), "@lr0.1": (("ascent",), {"ascent_lr": 0.1})}
#: memloc.retrain's settings (the runs' optimiser, AdamW at their lr, one-cycle) and the layers retrained,
#: one at a time: the token embedding, block 0's attention input and MLP up-projection, block 1's attention
#: output and MLP down-projection (named before looking at any result)
RETRAIN = dict(epochs=20, optimizer="adam", lr=3e-3)
RETRAIN_LAYERS = {"gpt": ("tok", "blocks.0.attn.qkv", "blocks.0.mlp.up", "blocks.1.attn.proj", "blocks.1.mlp.down"),
                  "hf:gpt2": ("transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                              "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj")}

DIFFERENCES = [
    "- Models and data: a 2-layer TinyGPT and GPT-2 config of width 64 (2 x 256 MLP neurons, 65,536 MLP weights) trained for 150 "
    "epochs on 512 TinyMem-style increment sequences with 10% noise in the suffix digits, on one CPU thread; TinyMem's "
    "2-layer math models are GPT-2-style models trained on GPUs on far more sequences, with noise anywhere in a "
    "sequence. Memorised = greedy decoding reproduces the 12-token suffix from the 12-token prefix.",
    "- Accuracy: ours is the held-out suffix token accuracy (and the rule accuracy, the share of held-out "
    "suffixes reproduced exactly); TinyMem's is its test accuracy on clean data.",
    "- Methods: the neuron methods are MemPi's as memloc implements them (memloc.neuron_scores), run per target "
    "and averaged over the targets, then the top fraction of each layer zeroed; TinyMem runs each on the batch of "
    "noisy sequences and sweeps its hyper-parameters per method and model, keeping the best, while every method "
    "here runs at memloc's defaults at three fractions. Their greedy is a weight-level greedy; ours (greedy) zeroes "
    "neurons and greedy_weights single weights.",
    "- BalancedSubnet / Subnet: TinyMem's edge-popup masks over every MLP matrix with its optimiser settings, but 50 "
    "epochs instead of 5 (over 51 targets + 64 clean sequences 5 epochs are 10 steps) and the clean part of each "
    "batch drawn from 64 clean training sequences.",
    "- Unlearning and layer retraining (memloc's own, not TinyMem's): memloc.unlearn fine-tunes with SGD "
    "(momentum 0.9, batch 128, 5 epochs) on the suffix loss of the clean training sequences (EWC / MAS: plus a "
    "penalty weighted by the Fisher / MAS importance of their suffixes, lambda 10; LwF: plus distillation of "
    "the original model's logits, lambda 1, T = 2), or ascends the targets' suffix loss (3 epochs, lr 0.003; "
    "@3x: lr 0.03 / ascent 0.009; ascent@lr0.03 / @lr0.1: ascent alone at those rates); "
    "memloc.retrain resets one layer to its initialisation and retrains it alone with the next-token loss on "
    "the clean sequences (AdamW, lr 3e-3, one-cycle, 20 epochs). Their 'changed' column: passes over the "
    "training data (retrain: the layer's parameters); no test loss is measured for them. Sink dropout is not "
    "in the table.",
]


def best(res, method: str) -> int:
    """The setting of ``method`` with the fewest targets left (then the highest token accuracy)."""
    rows = np.flatnonzero(res["method"].values == method)
    return int(min(rows, key=lambda i: (res["targets_memorised"].values[i], -res["test_accuracy"].values[i])))


def table(res) -> list[str]:
    acc0, loss0 = float(res["test_accuracy_before"]), float(res["test_loss_before"])
    lines = ["| setting | noisy memorised | clean memorised | token accuracy | change (points) | test loss change | "
             "rule accuracy | changed | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, name in enumerate(res["setting"].values):
        lines.append(f"| {name} | {res['targets_memorised'].values[i]:.1%} | {res['others_memorised'].values[i]:.1%} | "
                     f"{res['test_accuracy'].values[i]:.2%} | {100 * (res['test_accuracy'].values[i] - acc0):+.2f} | "
                     f"{res['test_loss'].values[i] - loss0:+.4f} | {res['rule_accuracy'].values[i]:.1%} | "
                     f"{int(res['changed'].values[i])} | {res['seconds'].values[i]:.2f} |")
    return lines


def beside(res, methods) -> list[str]:
    lines = ["| method | ours: noisy memorised (best setting) | ours: token accuracy | ours: seconds | TinyMem: noisy "
             "memorised | TinyMem: accuracy |", "|---|---:|---:|---:|---:|---:|"]
    for m in methods:
        i = best(res, m)
        theirs = TINYMEM.get(m, ("not quoted", None))
        lines.append(f"| {m} | {res['targets_memorised'].values[i]:.1%} ({res['setting'].values[i]}) | "
                     f"{res['test_accuracy'].values[i]:.2%} | {res['seconds'].values[i]:.1f} | {theirs[0]} | "
                     f"{theirs[1] or 'not quoted'} |")
    return lines


def goal(res) -> list[str]:
    """The issue's goal for memloc's best method, each condition stated separately."""
    acc0 = float(res["test_accuracy_before"])
    left, lost = GOAL
    ok = [i for i in np.flatnonzero(res["method"].values == OURS)
          if res["targets_memorised"].values[i] <= left and 100 * (acc0 - res["test_accuracy"].values[i]) <= lost]
    head = (f"Goal for memloc's best method ({OURS}): at most {left:.0%} of the noisy sequences left at no more than "
            f"{lost} points of token accuracy lost, faster than our BalancedSubnet on the same model.")
    if not ok:
        return [head, "", f"- memorisation and accuracy: **not met** by {OURS} at any fraction."]
    i = min(ok, key=lambda j: res["seconds"].values[j])
    lines = [head, "", f"- memorisation and accuracy: **met** by {res['setting'].values[i]}: "
             f"{res['targets_memorised'].values[i]:.1%} left, token accuracy {acc0:.2%} -> "
             f"{res['test_accuracy'].values[i]:.2%}, in {res['seconds'].values[i]:.1f} s."]
    bal = np.flatnonzero(res["method"].values == "balanced_subnet")
    if len(bal):
        fast = res["seconds"].values[bal]
        reached = [j for j in bal if res["targets_memorised"].values[j] <= left]
        lines.append(f"- speed: {'**met**' if res['seconds'].values[i] < fast.min() else '**not met**'}: our "
                     f"BalancedSubnet took {fast.min():.1f}-{fast.max():.1f} s per setting (50 epochs), "
                     f"{res['seconds'].values[i] / fast.min():.1f}x its fastest; "
                     + ("it reached the memorisation goal at no fraction here." if not reached else
                        f"it reached the memorisation goal at {', '.join(res['setting'].values[reached])}."))
        same = [j for j in np.flatnonzero(res["method"].values == OURS) if res["changed"].values[j] ==
                res["changed"].values[i] and res["targets_memorised"].values[j] == res["targets_memorised"].values[i]]
        if len(same) > 1:
            lines.append(f"- timing noise: {', '.join(res['setting'].values[same])} make the same edit and took "
                         + " / ".join(f"{res['seconds'].values[j]:.1f}" for j in same) + " s: on this shared machine "
                         "a ratio within about 20% of 1 is a tie.")
    return lines


def _row(name, noisy, clean, acc, acc0, rule, changed, seconds) -> str:
    return (f"| {name} | {noisy:.1%} | {clean:.1%} | {acc:.2%} | {100 * (acc - acc0):+.2f} | - | {rule:.1%} | "
            f"{changed} | {seconds:.2f} |")


def own_methods(run, name: str, res, device: str) -> tuple[list[str], list[tuple]]:
    """Rows of memloc.unlearn (every setting) and memloc.retrain (each layer), in the columns of :func:`table`,
    and (setting, noisy left, token accuracy change) of each."""
    acc0 = float(res["test_accuracy_before"])
    rows, summary = [], []
    for suffix, (methods, kw) in UNLEARN_SETTINGS.items():
        un = memloc.unlearn(run, methods=methods, seeds=(0,), device=device, **kw)
        base = un["baseline"]
        for key, before in (("forget_given", "targets_memorised_before"), ("retain", "others_memorised_before"),
                            ("test", "test_accuracy_before"), ("test_rule", "rule_accuracy_before")):
            assert abs(float(base.sel(group=key)) - float(res[before])) < 1e-9, (key, before)   # the same measures
        for m in methods:
            a = un["accuracy"].sel(technique=m, seed=0)
            g = {k: float(a.sel(group=k)) for k in ("forget_given", "retain", "test", "test_rule")}
            setting = f"unlearn:{m}{suffix}"
            rows.append(_row(setting, g["forget_given"], g["retain"], g["test"], acc0, g["test_rule"],
                             f"{float(un['passes'].sel(technique=m)):.1f} passes",
                             float(un["seconds"].sel(technique=m, seed=0))))
            summary.append((setting, g["forget_given"], 100 * (g["test"] - acc0)))
    for layer in RETRAIN_LAYERS[name]:
        start = time.perf_counter()
        rt = memloc.retrain(run, layers=[layer], device=device, **RETRAIN)
        seconds = time.perf_counter() - start
        last = rt["accuracy"].sel(layer=layer).isel(epoch=-1)
        model = run.model()
        params = dict(model.named_parameters())
        n = sum(params[k].numel() for k in trace(model, run.data().tokens[:2]).layer(layer).params)
        g = {k: float(last.sel(subset=k)) for k in ("noisy", "clean", "test_tokens", "test")}
        setting = f"retrain:{layer}"
        rows.append(_row(setting, g["noisy"], g["clean"], g["test_tokens"], acc0, g["test"], f"{n} params", seconds))
        summary.append((setting, g["noisy"], 100 * (g["test_tokens"] - acc0)))
    return rows, summary


def own_summary(summary, res) -> list[str]:
    """Which of memloc's own settings come closest to the goal, said plainly."""
    left, lost = GOAL
    ok = [s for s in summary if s[1] <= left and -s[2] <= lost]
    near = [s for s in summary if s[1] <= 0.05 and -s[2] <= 1.0]
    best = min(summary, key=lambda s: (s[1], -s[2]))
    lines = ["memloc's own methods (the unlearn: and retrain: rows): "
             + (f"{', '.join(s[0] for s in ok)} meet the goal ({left:.0%} left at <= {lost} points lost)." if ok
                else f"none meets the goal ({left:.0%} left at <= {lost} points lost).")
             + (f" Within 5% left at <= 1 point lost (issue 23's retraining acceptance): "
                f"{', '.join(f'{s[0]} ({s[1]:.1%}, {s[2]:+.2f})' for s in near)}." if near else
                " None leaves at most 5% at a cost of at most 1 point (issue 23's retraining acceptance).")
             + f" Fewest left: {best[0]} ({best[1]:.1%}, {best[2]:+.2f} points)."]
    return lines


def section(name: str, device: str, runs_dir: Path, methods: str) -> list[str]:
    """The tables of one lm_benchmark model (``gpt`` reuses the path runs_dir/gpt_mitigation)."""
    path = runs_dir / ("gpt_mitigation" if name == "gpt" else f"{name.replace(':', '_')}_mitigation")
    run, trained = ensure_run(path, name, device, MIT_RUN)
    warm = torch.randint(0, 10, (1, 24))         # imports (captum) and first calls are not charged to any method
    neuron_scores(run.model(device=device), warm, 12, 12,
                  options={"slimming": {"max_steps": 10}, "hard_concrete": {"max_steps": 10}})
    res = memloc.mitigate(run, methods=methods, device=device, **MITIGATE)
    own, summary = own_methods(run, name, res, device)
    data = run.data()
    return [f"## {MODELS[name]} (`{name}`)", "",
            (f"Training took {trained:.0f} s. " if trained is not None else "")
            + f"Before: the run reproduces {float(res['targets_memorised_before']):.1%} of its "
            f"{int(data.is_memorised_target.sum())} noisy sequences ({res.sizes['target']}) and "
            f"{float(res['others_memorised_before']):.1%} of its clean training sequences; held-out "
            f"({len(data.test_tokens)} test sequences): suffix loss {float(res['test_loss_before']):.4f}, token "
            f"accuracy {float(res['test_accuracy_before']):.2%}, rule accuracy "
            f"{float(res['rule_accuracy_before']):.1%}.", "",
            "### Every setting", "", *table(res), *own, "", *own_summary(summary, res), "",
            "### Beside TinyMem (2-layer math model)", "",
            "Ours: each method's setting with the fewest noisy sequences left (then the highest accuracy). "
            "TinyMem: its published figures as issue 24 quotes them.", "", *beside(res, list(res.config["methods"])),
            "", *goal(res), ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs/lm_benchmark", help="where the runs are written (and reused)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--markdown", default="artifacts/lm_mitigation.md", help="write the tables here")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    command = invocation(__file__, argv)
    sections = [line for name in args.models.split(",")
                for line in section(name, args.device, Path(args.runs_dir), args.methods)]
    lines = [f"`{command}`", "", "# Mitigation in language models: removing all memorised sequences at once "
             "(after TinyMem)", "", f"memloc {memloc.__version__}; {machine(args.device)}.", "",
             "Settings: runs (scripts/lm_benchmark.py's, 150 epochs) "
             + ", ".join(f"{k}={v}" for k, v in MIT_RUN.items())
             + "; memloc.mitigate " + ", ".join(f"{k}={v}" for k, v in MITIGATE.items())
             + "; every method at memloc's defaults (memloc.analyses.mitigation.HYPER).", "",
             "A setting is a method at a fraction: the share of each layer's neurons (neuron methods), of all MLP "
             "weights (greedy_weights' budget; it stops once no noisy sequence is reproduced) or of each MLP "
             "matrix's weights pruned (BalancedSubnet, Subnet); fine_tune takes none. 'changed': neurons or weights "
             "zeroed (fine_tune: epochs). Seconds: the edit alone, one CPU thread, wall-clock on a shared machine. "
             "The unlearn: and retrain: rows are memloc's own methods (memloc.unlearn, memloc.retrain; last item "
             "of the differences below): 'changed' is their passes over the training data / the retrained layer's "
             "parameters, seconds the whole call (EWC / MAS: with the importance pass; retrain: with its 21 "
             "evaluations); '-': no test loss measured.",
             "", *sections, "## What differs from TinyMem's setting", "", *DIFFERENCES]
    finish(lines, started, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
