"""``memloc rewind RUN``: layer rewinding (:func:`memloc.rewind`)."""
from ..analyses.rewind import rewind
from .runner import add_checkpoints, add_eval_batch_size, add_layers, add_precision, describe, layer_table

RESULT = "rewind"
SHARDED = True     # torchrun --nproc-per-node K -m memloc rewind RUN: the (checkpoint, layer) cells split K ways
DESCRIPTION = ("Rewind one layer at a time of the final model to an earlier checkpoint (parameters and norm "
               "buffers) and record accuracy on clean train, noisy train (given and true labels) and test. "
               "Writes RUN/results/rewind.h5; an interrupted run continues when the same command is run again.")
INTERRUPTED = "finished work is saved (rerun to continue)"
OVERWRITE_HELP = "replace an existing rewind.h5 (or an interrupted rewind saved with other settings)"


def arguments(p):
    add_checkpoints(p, "checkpoints to rewind to")
    add_layers(p)
    add_eval_batch_size(p)
    add_precision(p)


def execute(args):
    return rewind(args.run, checkpoints=args.checkpoints, layers=args.layers,
                  eval_batch_size=args.eval_batch_size, device=args.device,
                  resume_dir="auto", overwrite=args.overwrite, precision=args.precision)


def summary(res, args):
    subsets = list(res["subset"].values)
    first = res["accuracy"].isel(checkpoint=0)
    return (f"{res.sizes['checkpoint']} checkpoints x {res.sizes['layer']} layers; final model "
            f"(epoch {res.config['final_epoch']}): {describe(res['baseline'].values, subsets)}\n"
            f"rewound to epoch {int(res['checkpoint'][0])}:\n" + layer_table(res["layer"].values, subsets, first.values))
