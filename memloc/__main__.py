"""``python -m memloc <command> [args]``: dispatch to ``memloc.<command>.main``."""
import importlib
import sys

COMMANDS = {
    "train": "train a model under label noise into a run directory",
    "gradients": "per-layer gradient norms of clean / noisy / all losses and their cosine, per epoch",
    "rewind": "rewind one layer at a time to an earlier checkpoint; clean / noisy / test accuracy",
    "retrain": "reset one layer at a time and retrain only it on clean data",
    "flip": "greedy gradient-guided unit zeroing until each example's prediction flips",
    "scores": "per-example memorisation scores (loss, forgetting, EL2N, GraNd, AUM, neuron count...)",
    "detect": "noise detection metrics (AUROC, AP, precision@k) of every score",
    "dropout": "evaluate an example-tied-dropout run in test and drop mode",
    "report": "figures and a summary page for every result of a run",
    "demo": "the whole pipeline on MNIST-5k with 10% noise, from training to report",
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m memloc <command> [options]   (python -m memloc <command> --help)\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"memloc: error: unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"memloc.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"memloc.{name}":
            raise
        print(f"memloc: error: command {name!r} is not available in this version", file=sys.stderr)
        return 2
    module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
