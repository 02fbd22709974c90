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
fine-tuning protected by EWC / MAS / LwF; at its language-model defaults, the run's own optimiser, and a few
other settings), memloc.retrain (one layer reset and retrained alone on the clean sequences, for five layers
named before looking) and sink dropout (a second run trained with memorisation sinks, memloc.mitigate's sinks).

    python scripts/lm_mitigation.py --rows unlearn,sinks --models gpt   # only those rows, the rest kept
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
from lm_benchmark import MODELS, RUN, ensure_run  # noqa: E402

import memloc  # noqa: E402
from memloc.analyses.localise import neuron_scores  # noqa: E402
from memloc.analyses.mitigation import METHODS, _measures  # noqa: E402
from memloc.core.units import trace  # noqa: E402

#: scripts/lm_benchmark.py's TinyGPT run, trained for 150 epochs
MIT_RUN = {**RUN, "epochs": 150}
#: the second run, with memorisation sinks on both MLPs (train --etd-after mlp; memloc's p_gen / p_mem defaults)
SINKS_RUN = {**MIT_RUN, "etd_after": "mlp", "p_gen": 0.4, "p_mem": 0.1}
#: the groups of rows (--rows), in the table's order
GROUPS = ("mitigate", "unlearn", "retrain", "sinks")
#: the benchmark's settings (memloc.mitigate; every method at memloc's defaults)
MITIGATE = dict(fractions=(0.01, 0.05, 0.1), ref_batch_size=64, seed=0)
#: TinyMem's published 2-layer math-model figures (Sakarvadia et al., ICLR 2025), as the issue quotes them:
#: share of noisy sequences left memorised, and test accuracy after (None: not quoted)
TINYMEM = {"balanced_subnet": ("0.0% (from 96.0%)", "97.24% (from 97.26%), ~30 s"), "subnet": ("1.5%", "71.8%"),
           "ig": ("0%", "90.1%"), "hard_concrete": ("32%", None), "greedy": ("72% (their weight-level greedy)", None),
           "zero_out": ("94%", None)}
#: memloc's goal (issue 24): at most this share of targets left at no more than this many points of accuracy lost
GOAL = (0.01, 0.1)


def meets_goal(left: float, change: float) -> bool:
    """Whether a share ``left`` of the noisy sequences at an accuracy change of ``change`` points meets GOAL."""
    return left <= GOAL[0] and -change <= GOAL[1]


OURS = "fine_tune_greedy"
#: memloc.unlearn's methods in the table, and its settings (suffix: (methods, options)): its defaults (a language
#: model's run: AdamW at the run's lr, 20 epochs, ascent at 0.1x), fine-tuning at 5 epochs and at lr 0.01, ascent at 0.3x and 1x
#: the run's lr, and fine-tuning and ascent at the image defaults (SGD, momentum 0.9, lr 0.01 / 0.003, 5 epochs)
UNLEARN = ("finetune", "ascent", "ewc", "mas", "lwf")
UNLEARN_SETTINGS = {"": (UNLEARN, {}), "@5ep": (("finetune",), {"epochs": 5}), "@lr0.01": (("finetune",), {"lr": 0.01}),
                    "@lr0.001": (("ascent",), {"ascent_lr": 1e-3}), "@lr0.003": (("ascent",), {"ascent_lr": 3e-3}),
                    "@sgd": (("finetune", "ascent"), {"optimizer": "sgd"})}
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
    "neurons and greedy_weights single weights (keeping the loss of a new batch of 64 clean sequences low at each "
    "step); fine_tune_greedy (memloc's) fine-tunes every weight on the clean sequences for at most 6 epochs (Adam, "
    "lr 0.003, the runs' own), each step also raising the suffix loss of the noisy sequences that step still "
    "reproduces (weight 0.3), and then runs greedy_weights on any noisy sequence still reproduced.",
    "- BalancedSubnet / Subnet: TinyMem's edge-popup masks over every MLP matrix with its optimiser settings, but 50 "
    "epochs instead of 5 (over 51 targets + 64 clean sequences 5 epochs are 10 steps) and the clean part of each "
    "batch drawn from 64 clean training sequences.",
    "- Unlearning and layer retraining (memloc's own, not TinyMem's): memloc.unlearn at its language-model "
    "defaults fine-tunes with the run's own optimiser and lr (AdamW, lr 0.003, no weight decay, batch 128, 20 "
    "epochs) on the suffix loss of the clean training sequences (EWC / MAS: plus a penalty weighted by the Fisher / "
    "MAS importance of their suffixes, lambda 10; LwF: plus distillation of the original model's logits, lambda 1, "
    "T = 2), or ascends the targets' suffix loss (AdamW, 3 epochs, lr 0.0003 = 0.1x the run's); @5ep: 5 epochs; "
    "finetune@lr0.01: lr 0.01; "
    "ascent@lr0.001 / @lr0.003: ascent at those rates; @sgd: the image defaults (SGD, momentum 0.9, lr 0.01 / "
    "ascent 0.003, 5 epochs), on whose scale the run barely moves; "
    "memloc.retrain resets one layer to its initialisation and retrains it alone with the next-token loss on "
    "the clean sequences (AdamW, lr 3e-3, one-cycle, 20 epochs). Their 'changed' column: passes over the "
    "training data (retrain: the layer's parameters); no test loss is measured for them. Sink dropout "
    "(memloc.mitigate's sinks): a second run trained with memorisation sinks (MemSinks' example-tied dropout on the "
    "MLP neurons) measured with its sinks dropped.",
]


def best(res, method: str) -> int:
    """The setting of ``method`` with the fewest targets left (then the highest token accuracy)."""
    rows = np.flatnonzero(res["method"].values == method)
    return int(min(rows, key=lambda i: (res["targets_memorised"].values[i], -res["test_accuracy"].values[i])))


def table(res) -> list[str]:
    acc0, loss0 = float(res["test_accuracy_before"]), float(res["test_loss_before"])
    lines = table_header()
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
          if meets_goal(res["targets_memorised"].values[i], 100 * (res["test_accuracy"].values[i] - acc0))]
    head = (f"Goal for memloc's best method ({OURS}): at most {left:.0%} of the noisy sequences left at no more than "
            f"{lost} points of token accuracy lost, faster than our BalancedSubnet on the same model. Here: one draw "
            "(seed 0) on the run's 64 test sequences, where one token is 0.13 points; over eight draws, on 1,953 fresh "
            "test sequences and in CPU seconds of the edit: artifacts/lm_mitigation_speed.md.")
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


def own_methods(run, name: str, before: dict, device: str, groups) -> dict[str, list[str]]:
    """Rows of memloc.unlearn (every setting) and memloc.retrain (each layer), in the columns of :func:`table`,
    by group (those of ``groups``); ``before``: the run's measures (mitigation's)."""
    acc0 = before["test_accuracy"]
    rows = {"unlearn": [], "retrain": []}
    for suffix, (methods, kw) in (UNLEARN_SETTINGS.items() if "unlearn" in groups else ()):
        un = memloc.unlearn(run, methods=methods, seeds=(0,), device=device, **kw)
        base = un["baseline"]
        for key, mine in (("forget_given", "targets_memorised"), ("retain", "others_memorised"),
                          ("test", "test_accuracy"), ("test_rule", "rule_accuracy")):
            assert abs(float(base.sel(group=key)) - before[mine]) < 1e-9, (key, mine)   # the same measures
        for m in methods:
            a = un["accuracy"].sel(technique=m, seed=0)
            g = {k: float(a.sel(group=k)) for k in ("forget_given", "retain", "test", "test_rule")}
            rows["unlearn"].append(_row(f"unlearn:{m}{suffix}", g["forget_given"], g["retain"], g["test"], acc0,
                                        g["test_rule"], f"{float(un['passes'].sel(technique=m)):.1f} passes",
                                        float(un["seconds"].sel(technique=m, seed=0))))
    for layer in (RETRAIN_LAYERS[name] if "retrain" in groups else ()):
        start = time.perf_counter()
        rt = memloc.retrain(run, layers=[layer], device=device, **RETRAIN)
        seconds = time.perf_counter() - start
        last = rt["accuracy"].sel(layer=layer).isel(epoch=-1)
        model = run.model()
        params = dict(model.named_parameters())
        n = sum(params[k].numel() for k in trace(model, run.data().tokens[:2]).layer(layer).params)
        g = {k: float(last.sel(subset=k)) for k in ("noisy", "clean", "test_tokens", "test")}
        rows["retrain"].append(_row(f"retrain:{layer}", g["noisy"], g["clean"], g["test_tokens"], acc0, g["test"],
                                    f"{n} params", seconds))
    return {k: v for k, v in rows.items() if k in groups}


def sinks_rows(name: str, device: str, runs_dir: Path, before: dict) -> tuple[list[str], list[str]]:
    """The sink-dropout row (memloc.mitigate(methods=["sinks"]) on a second run, trained with sinks) and a
    sentence on that run, beside the run without sinks (``before``: its measures)."""
    path = runs_dir / f"{name.replace(':', '_')}_sinks"
    run, trained = ensure_run(path, name, device, SINKS_RUN)
    res = memloc.mitigate(run, methods=["sinks"], **MITIGATE)
    row = table(res)[2:]
    row = [line.replace("| sinks |", "| sinks (own run) |", 1) for line in row]
    note = (f"The sinks row is memloc.mitigate(methods=['sinks']) on a second run, trained the same way with "
            f"memorisation sinks on both MLPs (etd_after=mlp, p_gen={SINKS_RUN['p_gen']}, p_mem={SINKS_RUN['p_mem']}"
            + (f"; training took {trained:.0f} s" if trained is not None else "") + "): its change columns are "
            f"against that run with its sinks kept at test scale (p_mem), which reproduces "
            f"{float(res['targets_memorised_before']):.1%} of its noisy sequences and "
            f"{float(res['others_memorised_before']):.1%} of its clean ones at held-out token accuracy "
            f"{float(res['test_accuracy_before']):.2%} (suffix loss {float(res['test_loss_before']):.4f}, rule accuracy "
            f"{float(res['rule_accuracy_before']):.1%}); 'changed' is the sink neurons dropped, seconds the switch to "
            f"drop mode. Against the run without sinks ({before['targets_memorised']:.1%} of the noisy sequences, "
            f"token accuracy {before['test_accuracy']:.2%}), training with sinks leaves "
            f"{float(res['targets_memorised_before']):.1%} at test scale "
            f"({100 * (float(res['test_accuracy_before']) - before['test_accuracy']):+.2f} points) and "
            f"{float(res['targets_memorised'][0]):.1%} with the sinks dropped "
            f"({100 * (float(res['test_accuracy'][0]) - before['test_accuracy']):+.2f} points).")
    return row, [note]


def _parsed(line: str) -> tuple[str, float, float]:
    """(setting, noisy left, token accuracy change in points) of a row of :func:`table`."""
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    return cells[0], float(cells[1].rstrip("%")) / 100, float(cells[4])


def own_summary(rows: list[str]) -> list[str]:
    """Which of memloc's own settings (rows of the unlearn, retrain and sinks groups) come closest to the goal,
    and the best trade-offs among them, said plainly."""
    summary = [_parsed(line) for line in rows]
    if not summary:
        return []
    left, lost = GOAL
    ok = [s for s in summary if meets_goal(s[1], s[2])]
    near = [s for s in summary if s[1] <= 0.05 and -s[2] <= 1.0]
    best = min(summary, key=lambda s: (s[1], -s[2]))
    cheap = [s for s in summary if -s[2] <= lost]
    removed = [s for s in summary if s[1] <= left]
    lines = ["memloc's own methods (the unlearn:, retrain: and sinks rows): "
             + (f"the goal ({left:.0%} left at <= {lost} points lost) is met by {', '.join(s[0] for s in ok)}." if ok
                else f"none meets the goal ({left:.0%} left at <= {lost} points lost).")
             + (f" Within 5% left at <= 1 point lost (issue 23's retraining acceptance): "
                f"{', '.join(f'{s[0]} ({s[1]:.1%}, {s[2]:+.2f})' for s in near)}." if near else
                " None leaves at most 5% at a cost of at most 1 point (issue 23's retraining acceptance).")
             + f" Fewest left: {best[0]} ({best[1]:.1%}, {best[2]:+.2f} points)."
             + (" Best trade-offs: at most {:.0%} left, the least accuracy lost: {} ({:.1%}, {:+.2f} points)".format(
                 left, *max(removed, key=lambda s: (s[2], -s[1]))) if removed else
                f" No setting leaves at most {left:.0%}")
             + ("; at most {} points lost, the fewest left: {} ({:.1%}, {:+.2f} points).".format(
                 lost, *min(cheap, key=lambda s: (s[1], -s[2]))) if cheap else
                f"; none loses at most {lost} points.")]
    return lines


def section(name: str, device: str, runs_dir: Path, methods: str, groups) -> dict:
    """One lm_benchmark model (``gpt`` reuses the path runs_dir/gpt_mitigation): ``{"rows": {group: table rows},
    "notes": sentences after the table, "head": the lines before it, "tail": those after its summary}`` (head and
    tail only when the mitigate group runs: they come from its result)."""
    path = runs_dir / ("gpt_mitigation" if name == "gpt" else f"{name.replace(':', '_')}_mitigation")
    run, trained = ensure_run(path, name, device, MIT_RUN)
    data = run.data()
    before = _measures(run.model(device=device), data, slice(None), 64)
    out = {"rows": {}, "notes": [], "head": None, "tail": None}
    if "mitigate" in groups:
        warm = torch.randint(0, 10, (1, 24))         # imports (captum) and first calls are not charged to any method
        neuron_scores(run.model(device=device), warm, 12, 12,
                      options={"slimming": {"max_steps": 10}, "hard_concrete": {"max_steps": 10}})
        res = memloc.mitigate(run, methods=methods, device=device, **MITIGATE)
        out["rows"]["mitigate"] = table(res)[2:]
        out["head"] = [f"## {MODELS[name]} (`{name}`)", "",
                       (f"Training took {trained:.0f} s. " if trained is not None else "")
                       + f"Before: the run reproduces {float(res['targets_memorised_before']):.1%} of its "
                       f"{int(data.is_memorised_target.sum())} noisy sequences ({res.sizes['target']}) and "
                       f"{float(res['others_memorised_before']):.1%} of its clean training sequences; held-out "
                       f"({len(data.test_tokens)} test sequences): suffix loss {float(res['test_loss_before']):.4f}, "
                       f"token accuracy {float(res['test_accuracy_before']):.2%}, rule accuracy "
                       f"{float(res['rule_accuracy_before']):.1%}.", "", "### Every setting", ""]
        out["tail"] = ["### Beside TinyMem (2-layer math model)", "",
                       "Ours: each method's setting with the fewest noisy sequences left (then the highest accuracy). "
                       "TinyMem: its published figures as issue 24 quotes them.", "",
                       *beside(res, list(res.config["methods"])), "", *goal(res), ""]
    out["rows"].update(own_methods(run, name, before, device, groups))
    if "sinks" in groups:
        out["rows"]["sinks"], out["notes"] = sinks_rows(name, device, runs_dir, before)
    return out


def _group(line: str) -> str:
    setting = line.strip().strip("|").split("|")[0].strip()
    return next((g for g in GROUPS[1:] if setting.startswith(g)), "mitigate")


def table_header() -> list[str]:
    return ["| setting | noisy memorised | clean memorised | token accuracy | change (points) | test loss change | "
            "rule accuracy | changed | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]


def splice(old: list[str], got: dict) -> list[str]:
    """A model's section of the earlier artifact (``old``, from its '## ' heading to the next) with the rows of
    the groups regenerated in ``got`` replaced, its own-methods summary and notes redone, the rest kept."""
    start = old.index("### Every setting") + 2
    end = start + next(k for k, line in enumerate(old[start:]) if not line.startswith("|"))
    rows = {g: [] for g in GROUPS}
    for line in old[start + 2:end]:
        rows[_group(line)].append(line)
    rows.update(got["rows"])
    rest = old[end:]
    after = next(k for k, line in enumerate(rest) if line.startswith("### "))   # summary and notes end there
    notes = got["notes"] if "sinks" in got["rows"] else [
        line for line in rest[:after] if line and not line.startswith("memloc's own methods")]
    return [*(got["head"] or old[:start]), *body(rows, notes), *(got["tail"] or rest[after:])]


def body(rows: dict, notes: list[str]) -> list[str]:
    """The table of every setting (``rows`` by group), the summary of memloc's own rows and the notes."""
    return [*table_header(), *(line for g in GROUPS for line in rows.get(g, [])), "",
            *own_summary([line for g in GROUPS[1:] for line in rows.get(g, [])]), *(["", *notes] if notes else []), ""]


def sections_of(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """(the lines before the first model, {'## ' heading line: the lines of its section})."""
    lines = text.rstrip("\n").split("\n")
    heads = [k for k, line in enumerate(lines) if line.startswith("## ")]
    return lines[:heads[0]], {lines[a]: lines[a:b] for a, b in zip(heads, heads[1:] + [len(lines)])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs/lm_benchmark", help="where the runs are written (and reused)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--markdown", default="artifacts/lm_mitigation.md", help="write the tables here")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--rows", default=",".join(GROUPS),
                   help=f"comma-separated groups of rows to compute: {', '.join(GROUPS)} (mitigate: memloc.mitigate's "
                        "methods, the TinyMem comparison and the goal; sinks: a second run, trained with sinks). With "
                        "fewer than all (or fewer models), the other rows and sections are kept from --markdown's "
                        "earlier text and the artifact says which rows were regenerated, when and at which commit")
    args = p.parse_args(argv)
    groups = [g for g in args.rows.split(",") if g]
    bad = sorted(set(groups) - set(GROUPS))
    if bad:
        p.error(f"--rows: unknown group {bad[0]!r}; valid: {', '.join(GROUPS)}")
    models = args.models.split(",")
    partial = set(groups) != set(GROUPS) or set(models) != set(MODELS)
    torch.set_num_threads(1)
    started, load = time.time(), os.getloadavg()[0]
    command = invocation(__file__, argv)
    old_sections = sections_of(Path(args.markdown).read_text())[1] if partial else {}
    got = {f"## {MODELS[name]} (`{name}`)": section(name, args.device, Path(args.runs_dir), args.methods, groups)
           for name in models}
    sections = []
    for title in [f"## {MODELS[name]} (`{name}`)" for name in MODELS]:
        if title in got:
            sections += ([*got[title]["head"], *body(got[title]["rows"], got[title]["notes"]), *got[title]["tail"]]
                         if not partial else splice(old_sections[title], got[title]))
        elif title in old_sections:      # its summary redone from its table (a function of the rows alone)
            sections += splice(old_sections[title], {"rows": {}, "notes": [], "head": None, "tail": None})
    preamble = []
    if partial:
        old_text = Path(args.markdown).read_text()
        old_pre = sections_of(old_text)[0]
        took = [line for line in old_text.splitlines() if line.startswith("Total time")]
        preamble = [f"Regenerated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit()} by "
                    f"`{command}` ({machine(args.device)}, load average {load:.0f} at the start: "
                    "seconds are not comparable with other rows'): the "
                    f"{', '.join(groups)} rows of {', '.join(MODELS[m] for m in models)}; every other "
                    "row and section is from the earlier run below" + (f" ({took[-1][len('Total time: '):].rstrip('.')})"
                                                            if took else "") + ".", "", *old_pre]
    lines = preamble if partial else [
        f"`{command}`", "", "# Mitigation in language models: removing all memorised sequences at once "
        "(after TinyMem)", "", f"memloc {memloc.__version__}; {machine(args.device)}.", "",
        "Settings: runs (scripts/lm_benchmark.py's, 150 epochs) "
        + ", ".join(f"{k}={v}" for k, v in MIT_RUN.items())
        + "; memloc.mitigate " + ", ".join(f"{k}={v}" for k, v in MITIGATE.items())
        + "; every method at memloc's defaults (memloc.analyses.mitigation.HYPER).", "",
        "A setting is a method at a fraction: the share of each layer's neurons (neuron methods), of all MLP "
        "weights (greedy_weights' and fine_tune_greedy's budget; they stop once no noisy sequence is reproduced) or "
        "of each MLP matrix's weights pruned (BalancedSubnet, Subnet); fine_tune takes none. 'changed': neurons or "
        "weights zeroed (fine_tune: epochs; fine_tune_greedy: the weights zeroed after its fine-tuning). Seconds: "
        "the edit alone, one CPU thread, wall-clock on a shared machine. "
        "The unlearn:, retrain: and sinks rows are memloc's own methods (memloc.unlearn, memloc.retrain, "
        "memloc.mitigate's sinks; last item of the differences below): 'changed' is their passes over the "
        "training data / the retrained layer's parameters / the sink neurons dropped, seconds the whole call "
        "(EWC / MAS: with the importance pass; retrain: with its 21 evaluations); '-': no test loss measured.", ""]
    legacy = sorted({MODELS[m] for m in MODELS if any(line.startswith("| unlearn:") and "@3x" in line
                                                       for line in old_sections.get(f"## {MODELS[m]} (`{m}`)", []))
                     and (m not in models or "unlearn" not in groups)})
    lines += [*sections, "## What differs from TinyMem's setting", "", *DIFFERENCES] + (
        [f"- Not regenerated since memloc.unlearn took a language model's own optimiser: the unlearn: rows of "
         f"{', '.join(legacy)}, at the image defaults of the time (SGD, momentum 0.9, lr 0.01 / ascent 0.003, 5 "
         "epochs; @3x: lr 0.03 / ascent 0.009; ascent@lr0.03 / @lr0.1: ascent alone at those rates)."] if legacy else [])
    finish(lines, started, args.markdown)
    return 0


def commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
