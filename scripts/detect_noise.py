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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memloc  # noqa: E402
from memloc.core import registry  # noqa: E402

flip_command = registry.command("flip")       # flags of `memloc flip`, its settings check
scores_command = registry.command("scores")
from memloc.cli.runner import Formatter  # noqa: E402
from memloc.analyses.detect import format_table  # noqa: E402
from memloc.core.errors import MemlocError  # noqa: E402
from memloc.core.run import load  # noqa: E402
from memloc.analyses.scores import SCORES  # noqa: E402
from memloc.training.train import DEFAULTS, train  # noqa: E402

EPOCHS = {"mlp": 30, "lenet": 40}   # the test fixtures' settings: ~all noisy labels memorised


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="detect_noise.py", formatter_class=Formatter,
                                description="Train (or reuse) runs under label noise, run the flip search on a "
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
    p.add_argument("--flip-examples", default="noisy:200,clean:200", help="--examples of memloc flip")
    p.add_argument("--flip-args", default="", help="more memloc flip options (its flags, e.g. '--max-units 50 "
                   "--checkpoint 20'), as one quoted string")
    p.add_argument("--no-flip", action="store_true", help="skip the flip search (no neuron count)")
    p.add_argument("--checkpoint-k", type=int, default=None, help="--checkpoint-k of memloc scores (el2n, grand)")
    p.add_argument("--markdown", default=None, help="write the tables to this Markdown file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute; auto = cuda if available, else cpu")
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


def run_flip(run, args) -> None:
    """memloc.flip with --flip-examples and the memloc flip flags of --flip-args, saved to
    RUN/results/flip.h5 (resumable); skipped when that file already holds these settings."""
    p = argparse.ArgumentParser(prog="detect_noise.py --flip-args", add_help=False)
    flip_command.arguments(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    opts = p.parse_args(["--examples", args.flip_examples, "--device", args.device, *shlex.split(args.flip_args)])
    out = run.results_path("flip")
    if out.exists() and not opts.overwrite:
        if flip_command.already_done(opts, run):
            print(f"detect_noise.py: {out} is already complete for these settings (nothing to do)", file=sys.stderr)
            return
        raise MemlocError(f"{str(out)!r} exists with different settings; add --overwrite to --flip-args to replace it")
    memloc.flip(run, **vars(opts)).save(out)
    print(out)


def detect_tables(det, is_noisy) -> tuple[dict, dict | None, np.ndarray]:
    """The ``detect`` result as :func:`memloc.analyses.detect.format_table` tables: over each score's own
    examples, over the examples where every score is defined (None if that is all), and those ids."""
    own = {"names": [str(n) for n in det["score"].values], "direction": det["direction"].values,
           "size": det["size"].values, "noisy": det["noisy"].values, "base_rate": det["base_rate"].values,
           "values": det["values"].values}
    if "common_values" not in det:
        return own, None, np.arange(len(is_noisy))
    rows = det["common_example"].values
    k, noisy = len(own["names"]), int(np.asarray(is_noisy)[rows].sum())
    common = {**own, "values": det["common_values"].values, "size": np.full(k, len(rows)),
              "noisy": np.full(k, noisy), "base_rate": np.full(k, noisy / len(rows) if len(rows) else np.nan)}
    return own, common, rows


def analyse(run, args) -> dict:
    """Flip (if available), scores, detection; returns detect's tables plus what was done."""
    flip_note = None
    if args.no_flip:
        flip_note = "flip search skipped (--no-flip): no neuron count"
    elif not have_flip():
        flip_note = "memloc.flip is not available in this checkout: no neuron count"
        print(f"detect_noise.py: {flip_note}", file=sys.stderr)
    else:
        run_flip(run, args)
    names = [n for n in SCORES if n != "neuron_count" or not flip_note]
    sc = memloc.scores(run, methods=names, checkpoint=args.checkpoint_k, device=args.device)
    print(scores_command.summary(sc, args))   # one line per score: direction, defined, mean
    print(f"wrote {sc.save(run.results_path('scores'))}")
    det = memloc.detect(sc, is_noisy=run.is_noisy)
    own, common, rows = detect_tables(det, run.is_noisy)
    print(f"noise detection on {run.path} ({int(run.is_noisy.sum())} of {run.num_train} labels noisy); "
          "each score over the examples where it is defined:")
    print(format_table(own))
    if common is not None:
        print(f"\nevery score on the {len(rows)} examples where all are defined ({common['noisy'][0]} noisy):")
        print(format_table(common))
    print(f"wrote {det.save(run.results_path('detect'))}")
    return {"own": own, "common": common, "common_rows": rows, "flip_note": flip_note}


def markdown_section(run, res, args) -> str:
    m = run.metrics()
    cfg = run.config
    epoch_k = run.result("scores").config["checkpoint_k"]
    lines = [f"## {cfg.get('model')} on {cfg.get('dataset')}, {cfg.get('noise'):g} {cfg.get('noise_kind')} noise",
             "",
             f"Run: {run.final_epoch} epochs (seed {cfg.get('seed')}); at the end: clean train "
             f"{m['clean_accuracy'][-1]:.4f}, noisy train w.r.t. the given labels (memorised) "
             f"{m['noisy_accuracy'][-1]:.4f}, test {m['test_accuracy'][-1]:.4f}. "
             f"EL2N and GraNd use the checkpoint of epoch {epoch_k}.", ""]
    if res["flip_note"]:
        lines += [f"Neuron count: **not available** ({res['flip_note']}).", ""]
    else:
        fc = run.result("flip").config
        lines += [f"Neuron count: `memloc.flip --examples {fc.get('examples')}` (max_units {fc.get('max_units')}, "
                  f"repeats {fc.get('repeats')}, site {fc.get('site')}, epoch {fc.get('checkpoint')}).", ""]
    lines += ["Each score over the examples where it is defined (`dir`: +1 = higher means noisy, "
              "-1 = lower does; chance: AUROC 0.5, AP = base rate):", "",
              format_table(res["own"], markdown=True), ""]
    if res["common"] is not None:
        lines += [f"Every score on the same {len(res['common_rows'])} examples (where all are defined, "
                  "i.e. the flip sample):", "", format_table(res["common"], markdown=True), ""]
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
    try:
        if args.noise_kind not in ("symmetric", "pair"):
            raise MemlocError(f"unknown --noise-kind {args.noise_kind!r}; valid: symmetric, pair")
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
    except MemlocError as e:   # a user mistake: one line, exit status 2
        print(f"detect_noise.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("detect_noise.py: interrupted; finished work is saved (rerun to continue where supported)",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
