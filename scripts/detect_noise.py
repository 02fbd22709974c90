"""End to end: does the neuron count find mislabeled examples as well as the standard scores?

For each model: train a run under label noise (or reuse it), run the greedy flip search
(``memloc.flip``) on a sample of noisy and clean training examples, compute every per-example
score (``memloc.scores``) and compare them as noise detectors (``memloc.detect``: AUROC, AP,
precision at the true noise rate), printing the tables and optionally writing them as Markdown.

    python scripts/detect_noise.py --models mlp,lenet --markdown artifacts/detect_mnist5k.md
    python scripts/detect_noise.py --run runs/my_run            # reuse an existing run

Runs go to ``--runs-dir/<dataset>_<model>_<kind><noise>_seed<seed>`` and are reused (or
resumed) when they exist with the same settings; the flip search is itself resumable and is
skipped when its results already exist for the same settings. Without ``memloc.flip`` (or with
``--no-flip``) the neuron count is left out and the tables say so.
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memloc import cli, detect, scores  # noqa: E402
from memloc.cli import UserError  # noqa: E402
from memloc.h5 import read_config  # noqa: E402
from memloc.run import load  # noqa: E402
from memloc.train import DEFAULTS, train  # noqa: E402

EPOCHS = {"mlp": 30, "lenet": 40}   # the test fixtures' settings: ~all noisy labels memorised


def parse_args(argv=None):
    p = cli.parser("detect_noise.py", "Train (or reuse) runs under label noise, run the flip search on a "
                   "sample, compute every per-example score and compare them as noise detectors.")
    p.add_argument("--run", default=None, help="reuse this existing run directory (then --models, --dataset, "
                   "--noise... are ignored)")
    p.add_argument("--dataset", default="mnist5k", help="dataset of the runs to train")
    p.add_argument("--models", default="mlp,lenet", help="comma-separated model specs, one run each")
    p.add_argument("--noise", type=float, default=0.1, help="label-noise rate")
    p.add_argument("--noise-kind", default="symmetric", help="symmetric | pair")
    p.add_argument("--seed", type=int, default=0, help="training seed (and noise seed)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default per model: {EPOCHS}, else {DEFAULTS['epochs']})")
    p.add_argument("--runs-dir", default="runs", help="where new runs are written")
    p.add_argument("--flip-examples", default="noisy:200,clean:200", help="--examples of memloc.flip")
    p.add_argument("--flip-args", default="", help="more memloc.flip options, as one quoted string")
    p.add_argument("--no-flip", action="store_true", help="skip the flip search (no neuron count)")
    p.add_argument("--epoch-k", type=int, default=None, help="--epoch-k of memloc.scores (el2n, grand)")
    p.add_argument("--markdown", default=None, help="write the tables to this Markdown file")
    cli.add_device_arg(p)
    return p.parse_args(argv)


def have_flip() -> bool:
    return importlib.util.find_spec("memloc.flip") is not None


def run_dir_for(args, model: str) -> Path:
    tag = model.replace(":", "-").replace("/", "-")
    return Path(args.runs_dir) / f"{args.dataset}_{tag}_{args.noise_kind}{args.noise:g}_seed{args.seed}"


def train_or_reuse(args, model: str):
    cfg = {"dataset": args.dataset, "model": model, "noise": args.noise, "noise_kind": args.noise_kind,
           "seed": args.seed, "noise_seed": args.seed,
           "epochs": args.epochs or EPOCHS.get(model, DEFAULTS["epochs"])}
    path = run_dir_for(args, model)
    print(f"== {model}: run {path} ({'reused / resumed' if (path / 'run.json').exists() else 'training'})", flush=True)
    return train(path, cfg, device=args.device, resume=True)


def analyse(run, args) -> dict:
    """Flip (if available), scores, detection; returns detect's result plus what was done."""
    flip_note = None
    if args.no_flip:
        flip_note = "flip search skipped (--no-flip): no neuron count"
    elif not have_flip():
        flip_note = "memloc.flip is not available in this checkout: no neuron count"
        print(f"detect_noise.py: {flip_note}", file=sys.stderr)
    else:
        from memloc import flip
        flip.main([str(run.path), "--examples", args.flip_examples, "--device", args.device,
                   *shlex.split(args.flip_args)])
    names = [n for n in scores.SCORES if n != "neuron_count" or not flip_note]
    argv = [str(run.path), "--device", args.device, "--scores", ",".join(names)]
    if args.epoch_k is not None:
        argv += ["--epoch-k", str(args.epoch_k)]
    scores.main(argv)
    res = detect.main([str(run.path)])
    res["flip_note"] = flip_note
    return res


def markdown_section(run, res, args) -> str:
    m = run.metrics()
    cfg = run.config
    with h5py.File(run.results_path("scores"), "r") as f:
        epoch_k = read_config(f)["epoch_k"]
    lines = [f"## {cfg.get('model')} on {cfg.get('dataset')}, {cfg.get('noise'):g} {cfg.get('noise_kind')} noise",
             "",
             f"Run: {run.final_epoch} epochs (seed {cfg.get('seed')}); at the end: clean train "
             f"{m['clean_accuracy'][-1]:.4f}, noisy train w.r.t. the given labels (memorised) "
             f"{m['noisy_accuracy'][-1]:.4f}, test {m['test_accuracy'][-1]:.4f}. "
             f"EL2N and GraNd use the checkpoint of epoch {epoch_k}.", ""]
    if res["flip_note"]:
        lines += [f"Neuron count: **not available** ({res['flip_note']}).", ""]
    else:
        with h5py.File(run.results_path("flip"), "r") as f:
            fc = read_config(f)
        lines += [f"Neuron count: `memloc.flip --examples {fc.get('examples')}` (max_units {fc.get('max_units')}, "
                  f"repeats {fc.get('repeats')}, site {fc.get('site')}, epoch {fc.get('epoch')}).", ""]
    lines += ["Each score over the examples where it is defined (`dir`: +1 = higher means noisy, "
              "-1 = lower does; chance: AUROC 0.5, AP = base rate):", "",
              detect.format_table(res["own"], markdown=True), ""]
    if res["common"] is not None:
        lines += [f"Every score on the same {len(res['common_rows'])} examples (where all are defined, "
                  "i.e. the flip sample):", "", detect.format_table(res["common"], markdown=True), ""]
    return "\n".join(lines)


def summary_table(results) -> str:
    """Markdown: one row per score, AUROC over all / over the common sample for every run."""
    head, cols = ["score"], []
    for run, res in results:
        name = run.config.get("model", run.path.name)
        head += [f"{name} all"] + ([f"{name} sample"] if res["common"] is not None else [])
        cols.append(res)
    names = list(dict.fromkeys(n for res in cols for n in res["own"]["names"]))
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for n in names:
        row = [n]
        for res in cols:
            for table in (res["own"], res["common"]):
                if table is not None:
                    row.append(f"{table['values'][table['names'].index(n), 0]:.3f}" if n in table["names"] else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors("detect_noise.py"):
        if args.noise_kind not in ("symmetric", "pair"):
            raise UserError(f"unknown --noise-kind {args.noise_kind!r}; valid: symmetric, pair")
        runs = [load(args.run)] if args.run else [train_or_reuse(args, m.strip())
                                                  for m in args.models.split(",") if m.strip()]
        results = [(run, analyse(run, args)) for run in runs]
        summary = summary_table(results)
        print("\nAUROC summary (all = each score over the examples where it is defined; sample = the "
              "examples where every score is defined):\n" + summary)
        if args.markdown:
            cmd = "python scripts/detect_noise.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
            text = ("# Label-noise detection: neuron count vs standard scores\n\n"
                    f"Made by `{cmd}`.\n\n## AUROC summary\n\n`all`: each score over the training examples "
                    "where it is defined; `sample`: every score on the same examples (those where all scores "
                    "are defined, i.e. the flip sample when the neuron count is present).\n\n" + summary + "\n\n"
                    + "\n".join(markdown_section(run, res, args) for run, res in results))
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(text)
            print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
