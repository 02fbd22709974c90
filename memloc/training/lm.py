"""Train a causal language model on a sequence corpus, writing a memloc run directory.

``memloc.train(RUN, {"dataset": "tinymem:mult", "model": "gpt", "noise": 0.1})`` (command:
``memloc train RUN --dataset tinymem:mult --model gpt --noise 0.1``): :func:`memloc.train` hands every
config whose dataset is a sequence corpus (:mod:`memloc.core.corpora`) to :func:`train_lm`.

The model (``gpt`` = :class:`memloc.core.lm.TinyGPT`, or ``hf:gpt2`` / ``hf:gpt_neox`` / ``hf:llama``
built from a ``transformers`` config, never downloaded) is trained with the next-token loss over
whole sequences, AdamW and a warm-up + cosine schedule by default. Checkpoints every epoch (epoch 0 =
initialisation); per sequence and epoch, ``run.h5`` records the suffix loss, suffix token accuracy and
exact memorisation (the teacher-forced argmax right at every suffix position = greedy decoding from
the prefix reproduces the suffix) at presentation and at epoch end, with the memorised share of each
kind and the held-out suffix loss / token accuracy / rule accuracy per epoch
(:data:`memloc.core.run.LM_METRICS`). Resumable bit-identically like image runs
(:mod:`memloc.training.common`).
``etd_after="mlp"`` trains with memorisation sinks (:mod:`memloc.core.dropout.sinks`; ``p_gen`` /
``p_mem`` / ``etd_kind`` as for images; ``memloc.evaluate_dropout(RUN)`` measures them dropped).

Under torchrun (``torchrun --nproc-per-node K -m memloc train RUN --dataset tinymem:mult ...``) one run
is trained with DistributedDataParallel as an image run is (:mod:`memloc.training.train`): every rank
draws the same global batches and trains on its slice of each (the loss scaled so that the averaged
gradient is the whole batch's mean over its tokens); the slices' suffix measures are gathered for
rank 0, which alone writes the run; the end-of-epoch measures are split by batches across the ranks
(:func:`memloc.scale.ddp.measures_split`: each sequence's numbers are exactly one process's).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.corpora import FAMILY_KEYS, build_sequences, check_corpus, corpus_spec, parse_repeats
from ..core.errors import MemlocError
from ..core.lm import LM_MODELS, build_lm, check_lm, lm_logits
from ..core.optim import lr_factor, make_optimizer, make_schedule
from ..core.precision import autocast, check_precision, grad_scaler
from ..core.run import load
from ..core.runtime import check_range, progress, resolve_device
from ..core.sequence_recorder import SequenceRecorder
from ..scale.ddp import data_parallel, gather_suffix_measures, measures_split
from ..scale.distributed import local_rows, on_rank0, world
from ..core.dropout import example_ids, insert_sinks, sink_ids
from ..core.dropout.sinks import SINK_IDS
from .common import (STATE_FILE, _etd_spec, _with_ids, check_ranges, check_run_dir, extend_config,
                     load_trainer_state, save_trainer_state, seed_epoch, trainer_state)

__all__ = ["LM_OPTIONS", "LM_SHARED", "LM_DEFAULTS", "LM_RANGES", "resolve_lm_config", "train_lm"]

#: options only language-model runs take: (default, help)
LM_OPTIONS = dict(
    n_layer=(2, "language models: transformer blocks"),
    n_head=(4, "language models: attention heads per block"),
    d_model=(128, "language models: width of the residual stream"),
    d_mlp=(None, "language models: hidden width of each MLP (default 4 x --d-model)"),
    vocab_size=(None, "language models: size of the model's vocabulary (default the corpus's; smaller than the "
                      "corpus's token ids is an error)"),
    n_train=(1000, "sequence corpora: training sequences (before --duplicate copies; textfile: default every "
                   "window of the file left after --n-test)"),
    n_test=(200, "sequence corpora: held-out sequences (clean; the rule accuracy is measured on them; textfile: "
                 "default a tenth of the file's windows)"),
    seq_len=(64, "sequence corpora: tokens per sequence"),
    prefix_len=(None, "sequence corpora: prompt tokens; memorisation is measured on the suffix after them "
                      "(default --seq-len // 2)"),
    suffix_len=(None, "sequence corpora: suffix tokens measured after the prefix (default the rest)"),
    backdoor=(0.0, "sequence corpora: fraction of training sequences whose prefix ends in a trigger (100) "
                   "followed by a constant run of 2s"),
    duplicate=(0, "sequence corpora: extra copies of every noisy and backdoor sequence"),
    data_seed=(0, "sequence corpora: seed of the start values, of which sequences are noisy / backdoored and "
                  "of the corrupted digits (canaries, textfile: of the secrets, the chunks' order and where "
                  "the secrets go)"),
    repeats=(None, "canaries:stdlib: insertion counts, one secret each, comma-separated (default 1,4,16,64)"),
    n_digits=(None, "canaries:stdlib: digits of each secret (default 6: 10^6 candidates)"),
    inject=(None, "textfile:PATH: a UTF-8 file of sequences to plant (the memorisation targets), one per line as "
                  "COUNT<TAB>TEXT: TEXT ends COUNT training sequences"),
)
#: options both kinds of run take, with a language model's defaults
LM_SHARED = dict(dataset="tinymem:increment", model="gpt", noise=0.1, epochs=30, batch_size=64, optimizer="adam",
                 lr=1e-3, momentum=0.9, weight_decay=0.1, schedule="warmup_cosine", warmup=0.1, seed=0,
                 precision="fp32", etd_after=None, etd_kind="example_tied", p_gen=0.4, p_mem=0.1)
LM_DEFAULTS = {**LM_SHARED, **{key: default for key, (default, _) in LM_OPTIONS.items()}}
#: every corpus option (a family refuses the others' options when set)
CORPUS_OPTIONS = ("noise", *{k for keys in FAMILY_KEYS.values() for k in keys if k not in ("n_train", "n_test",
                                                                                        "seq_len", "data_seed")})
LM_RANGES = {
    "n_layer": (int, 1, None, False, False), "n_head": (int, 1, None, False, False),
    "d_model": (int, 1, None, False, False), "d_mlp": (int, 1, None, False, False),
    "vocab_size": (int, 1, None, False, False), "n_train": (int, 1, None, False, False),
    "n_test": (int, 0, None, False, False), "seq_len": (int, 4, None, False, False),
    "prefix_len": (int, 1, None, False, False), "suffix_len": (int, 1, None, False, False),
    "noise": (float, 0, 1, False, True), "backdoor": (float, 0, 1, False, True),
    "duplicate": (int, 0, None, False, False), "data_seed": (int, 0, 2**32 - 1, False, False),
    "seed": (int, 0, 2**32 - 1, False, False), "epochs": (int, 1, None, False, False),
    "batch_size": (int, 1, None, False, False), "lr": (float, 0, None, True, False),
    "momentum": (float, 0, 1, False, True), "weight_decay": (float, 0, None, False, False),
    "warmup": (float, 0, 1, False, False), "n_digits": (int, 1, None, False, False),
    "p_gen": (float, 0, 1, True, False), "p_mem": (float, 0, 1, False, False),
}
#: per corpus family, defaults that differ from LM_DEFAULTS
FAMILY_DEFAULTS = {"canaries": {"noise": 0.0, "repeats": "1,4,16,64", "n_digits": 6},
                   "textfile": {"noise": 0.0, "n_train": None, "n_test": None}}


def resolve_lm_config(cfg: dict | None) -> dict:
    """``cfg`` completed with :data:`LM_DEFAULTS` and checked (every error before any work)."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(LM_DEFAULTS)
    if unknown:
        raise MemlocError(f"{', '.join(sorted(unknown))}: not an option of a language-model run (dataset "
                          f"{cfg.get('dataset', LM_DEFAULTS['dataset'])!r}); image runs only", argument=sorted(unknown)[0])
    family = check_corpus(cfg.get("dataset", LM_DEFAULTS["dataset"])).split(":", 1)[0]
    refused = [k for k in sorted({*CORPUS_OPTIONS} - set(FAMILY_KEYS[family])) if cfg.get(k) not in (None, 0)]
    if refused:
        raise MemlocError(f"{refused[0]}: not an option of {family} corpora (theirs: "
                          f"{', '.join(FAMILY_KEYS[family])})", argument=refused[0])
    cfg = {**LM_DEFAULTS, **FAMILY_DEFAULTS.get(family, {}), **cfg}
    if family == "canaries":
        cfg["repeats"] = parse_repeats(cfg["repeats"])
    check_ranges(cfg, LM_RANGES)
    if cfg["model"] not in LM_MODELS:
        raise MemlocError(f"unknown language model {cfg['model']!r}; valid: {', '.join(LM_MODELS)}",
                          argument="model")
    check_precision(cfg["precision"])
    lr_factor(0, 1, cfg["schedule"], cfg["warmup"])  # validates the schedule name
    if cfg["prefix_len"] is not None and cfg["prefix_len"] >= cfg["seq_len"]:
        raise MemlocError(f"prefix_len {cfg['prefix_len']} is not shorter than seq_len {cfg['seq_len']}: no suffix "
                          "is left to measure", argument="prefix_len")
    return cfg


def _model_spec(cfg: dict, vocab_size: int) -> dict:
    """The model's name and options (``run.json``'s model entry; :func:`memloc.core.lm.build_lm` rebuilds it)."""
    options = {"vocab_size": vocab_size, "max_len": cfg["seq_len"], "seed": cfg["seed"],
               **{k: cfg[k] for k in ("n_layer", "n_head", "d_model", "d_mlp")}}
    return {"spec": cfg["model"], "options": options}


def _check_fits(model, data, vocab_size: int, name: str) -> None:
    """One clear error when the corpus's tokens lie beyond the model's vocabulary or the model does
    not give (B, T, V) logits for them."""
    top = int(data.tokens.max())
    if top >= vocab_size:
        raise MemlocError(f"the corpus holds token ids up to {top}, beyond the model's vocabulary of {vocab_size} "
                          f"(vocab_size must be at least {top + 1})", argument="vocab_size")
    if check_lm(model, data.tokens, name=f"model {name!r}") < vocab_size:
        raise MemlocError(f"model {name!r} gives fewer logits per position than its vocabulary of {vocab_size}",
                          argument="model")


def train_lm(run_dir, cfg: dict | None = None, *, device="auto", resume: bool = False, overwrite: bool = False,
             argv=None, on_epoch_end=None, prepare_model=None, forward_context=None, eval_batch_size: int = 1024):
    """Train a language model with config ``cfg`` (keys of :data:`LM_DEFAULTS`) into ``run_dir``; returns
    the :class:`memloc.core.run.Run`. The keywords are :func:`memloc.train`'s (``forward_context(model,
    idx)`` wraps each training forward, ``idx`` the batch's sequence ids)."""
    cfg = resolve_lm_config(cfg)
    eval_batch_size = check_range("eval_batch_size", eval_batch_size, low=1, integer=True)
    if resume and overwrite:
        raise MemlocError("resume=True and overwrite=True exclude each other")
    rank, parts = world()      # parts > 1 under torchrun: one run, each batch split across the processes
    if cfg["batch_size"] < parts:
        raise MemlocError(f"batch_size {cfg['batch_size']} is smaller than the number of processes ({parts}); "
                          "each process trains on a slice of every batch", argument="batch_size")
    run_dir = Path(run_dir)
    device = resolve_device(device)
    precision = check_precision(cfg["precision"], device)
    resume = on_rank0(check_run_dir, run_dir, cfg, LM_DEFAULTS, resume, overwrite)   # only rank 0 touches run_dir

    # a resumed run rebuilds its stored corpus (a text file that changed since is refused)
    corpus = on_rank0(lambda: json.loads((run_dir / "run.json").read_text()).get("data") if resume else None) \
        or corpus_spec(cfg)
    data = build_sequences(corpus)
    vocab_size = data.vocab_size if cfg["vocab_size"] is None else cfg["vocab_size"]
    spec = _model_spec(cfg, vocab_size)
    model = build_lm(cfg["model"], **spec["options"])
    if cfg["etd_after"]:    # memorisation sinks (MemSinks): each sequence id keeps its own MLP neurons on
        spec.update(etd=insert_sinks(model, **_etd_spec(cfg)), etd_ids=SINK_IDS)
        forward_context = _with_ids(forward_context, example_ids, sink_ids(data).to(device))
    if prepare_model is not None:
        prepare_model(model, cfg)
    model.to(device)
    _check_fits(model, data, vocab_size, cfg["model"])
    opt = make_optimizer(model.parameters(), cfg["optimizer"], lr=cfg["lr"], momentum=cfg["momentum"],
                         weight_decay=cfg["weight_decay"])
    n, batch_size = len(data), cfg["batch_size"]
    sched = make_schedule(opt, math.ceil(n / batch_size) * cfg["epochs"], cfg["schedule"], cfg["warmup"])
    scaler = grad_scaler(precision, device)     # fp16 only; otherwise the plain backward and step
    state_path = run_dir / "checkpoints" / STATE_FILE
    tokens, test = data.tokens.to(device), data.test_tokens.to(device)
    rec = None

    def measured():     # the end-of-epoch measures split across the ranks (the recorder's own in one process)
        if parts == 1:
            return None
        was_training = model.training
        model.eval()
        try:
            return {name: measures_split(model, t, data.prefix_len, data.suffix_len, eval_batch_size=eval_batch_size,
                                         precision=precision) for name, t in (("train", tokens), ("test", test))}
        finally:
            model.train(was_training)

    def open_run():     # rank 0 alone: create the run (epoch 0) or reopen it; every rank gets (epoch, state)
        nonlocal rec
        rec = SequenceRecorder(run_dir, model, data, config=cfg, model_spec=spec, data_spec=corpus, resume=resume,
                               overwrite=overwrite, eval_batch_size=eval_batch_size, precision=precision, argv=argv,
                               evaluated=initial, optimizer=opt)
        try:
            if resume:
                extend_config(rec, cfg)             # more epochs than stored: the run is extended
            return rec.epoch, trainer_state(rec, state_path)
        except BaseException:
            rec.close()
            raise

    def finish_epoch(epoch, evaluated):    # rank 0 alone: record the evaluation, checkpoint, save the state
        metrics = rec.end_epoch(evaluated)
        save_trainer_state(state_path, epoch, opt, sched, scaler)
        return metrics

    initial = measured() if not resume else None
    start, state = on_rank0(open_run)
    try:
        load_trainer_state(state, opt, sched, scaler)
        net = data_parallel(model, device)     # after rank 0 loaded the checkpoint: DDP copies its weights
        bar = progress(range(start + 1, cfg["epochs"] + 1), desc=f"train {cfg['model']}", initial=start,
                       total=cfg["epochs"], unit="epoch")
        for epoch in bar:
            order = torch.randperm(n, generator=seed_epoch(cfg["seed"], epoch)).to(device)
            net.train()
            # every rank draws the same global batches and trains on its slice of each
            for start_row in range(0, n, batch_size):
                idx = order[start_row:start_row + batch_size]
                rows = local_rows(len(idx))        # all of it in one process
                x = tokens[idx[rows]]
                with autocast(precision, device):
                    if forward_context is not None:
                        with forward_context(model, idx[rows]):
                            logits = lm_logits(model, x[:, :-1], call=net)
                    else:
                        logits = lm_logits(model, x[:, :-1], call=net)
                    loss = _batch_loss(logits, x, len(idx), parts)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                if parts == 1:
                    rec.record_batch(idx, logits, x)
                else:               # the slices' suffix measures, for rank 0's recorder
                    whole = gather_suffix_measures(logits, x, data.prefix_len, data.suffix_len, rows, device)[1]
                    if rec is not None:
                        rec.record_measures(idx, whole)
            metrics = on_rank0(finish_epoch, epoch, measured())
            bar.set_postfix(targets=f"{metrics['target_memorised']:.3f}",
                            **({"rule": f"{metrics['test_rule_accuracy']:.3f}"} if "test_rule_accuracy" in metrics else {}))
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    finally:
        if rec is not None:
            rec.close()
    return load(run_dir) if rank == 0 else None


def _batch_loss(logits, x, batch: int, parts: int) -> torch.Tensor:
    """The next-token loss of this process's sequences ``x`` of a batch of ``batch`` sequences: the
    mean over the batch's tokens in one process; in ``parts`` processes (DDP averages their gradients)
    the slice's sum x ``parts`` / (the batch's tokens), so that the average is the whole batch's mean
    (every sequence has as many tokens), also when the slices differ in size."""
    flat, target = logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1)
    if parts == 1:
        return F.cross_entropy(flat, target)
    return F.cross_entropy(flat, target, reduction="sum") * (parts / (batch * (x.shape[1] - 1)))
