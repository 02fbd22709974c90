"""Flip searches over the examples of a run (or of a model and data), returned as a result."""
from __future__ import annotations

import time

import numpy as np
import torch
import xarray as xr

from ...scale.distributed import broadcast, shard, world
from ...core.errors import MemlocError
from ...core.results import Result
from ...scale.parts import Parts, parts_folder
from ...core.precision import apply_channels_last, autocast, check_precision
from ...core.runtime import check_flag, check_range, progress
from ...core.selection import resolve
from ...core.tasks import SequenceTask, task_of
from ...core.neurons import UNIT_KINDS, check_units, unit_structure
from ...core.units import SITES as UNIT_SITES
from .search import FlipSearch
from .select import examples_spec, reference_batches, select_examples
from .store import FLIP_PARTS, csr, layer_histogram
from .weights import WeightFlipSearch, lm_weight_params
from .embed_noise import token_embedding
from ...core.deprecation import renamed
from ...core.store import stored

__all__ = ["flip", "settings", "part_settings", "DTYPES", "REF_POOLS", "SITES", "PROTOCOLS", "protocol_options"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
REF_POOLS = ("clean", "all")
SITES = UNIT_SITES + ("weight",)
#: what the command, the log and the report say when the weight site's batched searches fell back to a loop
WEIGHT_LOOP = ("the weight site ran one search at a time (vmap could not batch this model's layers; the same items, "
               "only slower)")
#: Defaults of the options a protocol sets (explicit values always win). ``paper``: the official
#: code's rule and settings (weight site, logits averaged over 5 noised copies of norm 0.01 x the
#: input's, a 512-example reference batch, one search per example); memloc's default zeroes units
#: (one mechanism per channel / feature, comparable across layers and architectures, and 40-200x
#: fewer candidates per step), no noise (deterministic, cheaper) and a 64-example reference batch.
PROTOCOLS = {
    "memloc": {"site": "pre_norm", "noise_samples": 0, "noise_ratio": 0.01, "ref_batch_size": 64, "repeats": 1,
               "ref_pool": "clean"},
    "paper": {"site": "weight", "noise_samples": 5, "noise_ratio": 0.01, "ref_batch_size": 512, "repeats": 1,
              "ref_pool": "clean"},
}


def protocol_options(protocol: str, is_noisy=None, **given) -> dict:
    """The options of ``protocol`` with the ``given`` ones that are not None put over them. With the
    run's ``is_noisy``, a reference batch size taken from the protocol is capped at the size of
    the reference pool (an explicit size is not)."""
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise MemlocError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}", argument="protocol")
    options = {**PROTOCOLS[protocol], **{k: v for k, v in given.items() if v is not None}}
    if is_noisy is not None and given.get("ref_batch_size") is None:
        is_noisy = np.asarray(is_noisy, bool)
        pool = len(is_noisy) if options["ref_pool"] == "all" else int((~is_noisy).sum())
        options["ref_batch_size"] = max(1, min(options["ref_batch_size"], pool))
    return options


def _check(max_units, repeats, group_size, eval_batch_size, noise_samples, noise_ratio, seed, site, ref_pool, dtype,
           precision="fp32") -> tuple:
    """The numbers among the arguments, checked, as Python numbers (max_units ... seed)."""
    max_units, repeats, group_size, eval_batch_size = (check_range(name, value, low=1, integer=True) for name, value in (
        ("max_units", max_units), ("repeats", repeats), ("group_size", group_size), ("eval_batch_size", eval_batch_size)))
    noise_samples = check_range("noise_samples", noise_samples, low=0, integer=True)
    noise_ratio = check_range("noise_ratio", noise_ratio, low=0)
    seed = check_range("seed", seed, low=0, high=2**32 - 1, integer=True)
    for name, value, valid in (("site", site, SITES), ("ref_pool", ref_pool, REF_POOLS), ("dtype", dtype, DTYPES)):
        if not isinstance(value, str) or value not in valid:
            raise MemlocError(f"unknown {name} {value!r}; valid: {', '.join(valid)}", argument=name)
    if check_precision(precision) != "fp32" and dtype != "float32":
        raise MemlocError(f"precision {precision} (autocast to 16 bits) and dtype {dtype} exclude each other; use "
                          "dtype float32 with it", argument="precision")
    return max_units, repeats, group_size, eval_batch_size, noise_samples, noise_ratio, seed


def settings(is_noisy, *, checkpoint, examples, max_units, noise_samples, noise_ratio, repeats, site, collateral,
             ref_batch_size, ref_pool, seed, dtype, precision="fp32", units="outputs") -> tuple[dict, np.ndarray, np.ndarray]:
    """The config a search records, its example ids and its reference batches (R, B)."""
    examples = examples_spec(examples, len(is_noisy))      # values are recorded in their text form
    ids = select_examples(examples, is_noisy, seed=seed)
    pool = np.arange(len(is_noisy)) if ref_pool == "all" else np.flatnonzero(~is_noisy)
    refs = reference_batches(pool, ref_batch_size, repeats, seed=seed)
    config = {"checkpoint": checkpoint, "site": site, "max_units": max_units, "repeats": repeats,
              "noise_samples": noise_samples, "noise_ratio": noise_ratio, "ref_batch_size": ref_batch_size,
              "ref_pool": ref_pool, "seed": seed, "examples": examples, "dtype": dtype, "precision": precision,
              "collateral": collateral, "num_examples": len(ids), "units": units}
    return config, ids, refs


def part_settings(config: dict, ids) -> dict:
    """What the part files of a search must agree on to be resumed."""
    return {**config, "example_ids": np.asarray(ids).tolist()}


@renamed(resume_dir="resume")
@stored('flip')
def flip(source, data=None, *, examples="noisy:100,clean:100", checkpoint: int | None = None,
         max_units: int = 100, noise_samples: int | None = None, noise_ratio: float | None = None,
         repeats: int | None = None, site: str | None = None, collateral: bool = False, group_size: int = 32,
         ref_batch_size: int | None = None, ref_pool: str | None = None, protocol: str = "memloc", seed: int = 0,
         dtype: str = "float32", eval_batch_size: int = 1024, device="auto", resume="auto",
         overwrite: bool = False, log=None, precision: str = "fp32", units: str = "outputs") -> Result | None:
    """Greedy unit-zeroing searches (see :mod:`memloc.flip`) of the ``examples`` of a run.

    ``source``: a :class:`memloc.Run` / run path (``checkpoint``: its epoch, default final), or an
    ``nn.Module`` with ``data`` (a :class:`memloc.core.data.Data`; ``is_noisy`` comes from it).
    A language model's run (or a causal LM with a :class:`memloc.core.sequences.SequenceSet`): its
    memorisation targets are the noisy examples, the other training sequences the clean ones; a
    sequence is searched when the model reproduces its suffix exactly (the argmax right at every
    suffix position, teacher-forced), its loss is the suffix loss, and a search stops once the suffix
    is no longer reproduced exactly (:mod:`memloc.core.tasks`). There ``site="weight"`` zeroes the
    weights and biases of the layers whose outputs are the units (the blocks' projections;
    :func:`memloc.analyses.flip.weights.lm_weight_params`) and ``noise_samples`` noises the token
    embeddings (:mod:`memloc.analyses.flip.embed_noise`; the result's config says ``noised``:
    ``token_embeddings``, ``inputs`` on images). ``label`` is -1 for sequences.
    ``resume``: folder of the resumable part files (``"auto"``: ``RUN/results/flip.partial``
    for a run, none for a model); finished searches found there with the same settings are not
    redone (also with ``overwrite``, which only discards parts made with other settings). The parts are deleted when
    the result is saved (:meth:`memloc.Result.save`). ``log(message)`` receives progress notes
    (misclassified examples, resumption). ``protocol`` (``memloc`` | ``paper``, :data:`PROTOCOLS`)
    supplies the options left at None: ``site``, ``noise_samples``, ``noise_ratio``,
    ``ref_batch_size``, ``repeats``, ``ref_pool``. ``site="weight"`` zeroes parameter items by the
    official rule (:mod:`memloc.analyses.flip.weights`). ``precision`` (``"fp32"``, ``"bf16"``, ``"fp16"``;
    16 bits only with ``dtype="float32"``) runs the searches' forward passes under autocast
    (:mod:`memloc.core.precision`). ``units`` (:data:`memloc.core.neurons.UNIT_KINDS`): ``"outputs"``
    zeroes every conv / linear layer's output channels / features (any model); on a language model
    ``"mlp"`` its MLP hidden neurons, ``"heads"`` its attention heads (a head's slice of the attention
    output before the output projection), ``"both"`` the two (:func:`memloc.core.neurons.unit_structure`).
    Returns the ``"flip"`` result.
    """
    if log is not None and not callable(log):
        raise MemlocError(f"log must be a function of one message, got {type(log).__name__}", argument="log")
    log = log or (lambda msg: None)
    collateral = check_flag("collateral", collateral)
    units = check_units(units)
    if ref_batch_size is not None:
        ref_batch_size = check_range("ref_batch_size", ref_batch_size, low=1, integer=True)
    chosen = dict(site=site, noise_samples=noise_samples, noise_ratio=noise_ratio, ref_batch_size=ref_batch_size,
                  repeats=repeats, ref_pool=ref_pool)
    opts = protocol_options(protocol, **chosen)
    (max_units, opts["repeats"], group_size, eval_batch_size, opts["noise_samples"], opts["noise_ratio"],
     seed) = _check(max_units, opts["repeats"], group_size, eval_batch_size, opts["noise_samples"], opts["noise_ratio"],
                    seed, opts["site"], opts["ref_pool"], dtype, precision)
    if checkpoint is not None:
        checkpoint = check_range("checkpoint", checkpoint, low=0, integer=True)
    src = resolve(source, data, device=device, checkpoint=checkpoint)
    model, data, dev, epoch = src.model, src.data, src.device, src.checkpoint
    check_precision(precision, dev)
    apply_channels_last(model, precision, dev)
    task = task_of(data)
    lm = isinstance(task, SequenceTask)
    opts = protocol_options(protocol, task.is_noisy, **chosen)
    site, noise_samples, noise_ratio, repeats, ref_batch_size, ref_pool = (
        opts[k] for k in ("site", "noise_samples", "noise_ratio", "repeats", "ref_batch_size", "ref_pool"))
    _check_units(units, lm, site, f" (set by protocol {protocol!r})" if chosen["site"] is None else "")
    is_noisy = task.is_noisy
    given = np.full(len(is_noisy), -1) if lm else np.asarray(data.label_given)
    config, ids, refs = settings(is_noisy, checkpoint=epoch, examples=examples, max_units=max_units,
                                 noise_samples=noise_samples, noise_ratio=noise_ratio, repeats=repeats, site=site,
                                 collateral=collateral, ref_batch_size=ref_batch_size, ref_pool=ref_pool, seed=seed,
                                 dtype=dtype, precision=precision, units=units)
    train = task.train
    x = train.x[torch.as_tensor(ids, device=train.x.device)]
    y = task.target(x, train.y[torch.as_tensor(ids, device=train.y.device)])
    ridx = torch.as_tensor(refs, device=train.x.device)
    structure = None if units == "outputs" else unit_structure(model, train.x[ridx[0, :1]], units)
    kw = {} if structure is None else {"structure": structure}
    if lm and noise_samples:        # the noise goes on the token embeddings: the model must have them
        token_embedding(model, train.x[:1], task.outputs)
    elif noise_samples and not train.x.is_floating_point():
        raise MemlocError(f"noise_samples {noise_samples}: this classifier's inputs are integers (token ids), which take "
                          "no Gaussian noise; use {noise_samples}", options={"noise_samples": 0}, argument="noise_samples")
    if site == "weight" and lm:     # the parameters of the layers whose outputs are flip's units
        kw = {"params": lm_weight_params(model, train.x[ridx[0, :2]])}
    with autocast(precision, dev):
        search = (WeightFlipSearch if site == "weight" else FlipSearch)(
            model, train.x[ridx], task.target(train.x[ridx], train.y[ridx]), refs, site=site, dtype=DTYPES[dtype],
            task=task, cache_prefix=task.prefix_cache, **kw)
        status = (~search.correct(x, y)).cpu().numpy().astype(np.int8)
    structure = search.structure
    status = broadcast(status)      # split across processes: every rank works from rank 0's list
    rank = world()[0]
    if status.any() and rank == 0:
        log(f"memloc.flip: {int(status.sum())} of {len(ids)} examples are "
            f"{'not reproduced exactly' if lm else 'misclassified'} by the model and are recorded with status 1 "
            "(not searched)")
    parts = Parts(parts_folder(resume, src.run, "flip"), part_settings(config, ids), what="search",
                  overwrite=overwrite, fmt=FLIP_PARTS)
    try:
        todo = [(k, r) for k in np.flatnonzero(status == 0) for r in range(repeats)
                if (int(ids[k]), r) not in parts.done]
        if parts.done and rank == 0:
            log(f"memloc.flip: resuming: {len(parts.done)} searches already saved, {len(todo)} to go")
        with autocast(precision, dev):
            _search(search, parts, x, y, ids, shard(todo, key=lambda t: t[0]), task, model, collateral=collateral,
                    group_size=group_size, eval_batch_size=eval_batch_size, max_units=max_units,
                    noise_samples=noise_samples, noise_ratio=noise_ratio, seed=seed)
        parts.gather()
    finally:
        parts.release()
    if rank > 0:
        return None             # rank 0 merges the parts and writes the result
    if noise_samples:       # what the noise was added to
        config = {**config, "noised": "token_embeddings" if lm else "inputs"}
    if site == "weight":
        config = {**config, **search.path()}
        if config["weight_site_path"] == "loop":
            log(f"memloc.flip: {WEIGHT_LOOP} ({config['weight_site_fallback']})")
    result = _result(parts, ids, is_noisy, given, status, repeats, structure, refs, max_units, config, task.subsets)
    return result


def _check_units(units, lm, site, by=""):
    """What the unit kinds other than layer outputs need: a language model, and the unit site (``by``: the
    protocol that set the site, for the message)."""
    if units == "outputs":
        return
    if not lm:
        raise MemlocError(f"units {units!r} are a language model's MLP neurons / attention heads; a classifier's "
                          "units are its layers' outputs: use {units}", options={"units": "outputs"}, argument="units")
    if site != "pre_norm":
        what = "zeroes parameter items, not units" if site == "weight" else "applies to layer outputs"
        raise MemlocError(f"site {site!r}{by} {what}; units {units!r} are zeroed at the input of the down- / output "
                          "projection: use {site}", options={"site": "pre_norm"}, argument="site")


def _search(search, parts, x, y, ids, todo, task, model, *, collateral, group_size, eval_batch_size, **kw):
    """Run the searches ``todo``, saving finished ones in ``parts`` (also on Ctrl-C)."""
    structure, dev = search.structure, x.device
    pending: dict = {}
    last = time.monotonic()
    bar = progress(total=len(todo), desc="flip", unit="search")
    try:
        for t in search.run(x, y, ids, todo, group_size=group_size, **kw):
            col = np.full(len(task.subsets), np.nan)
            if collateral:
                mask = torch.ones(structure.n_units, device=dev)
                mask[torch.as_tensor(t.units, device=dev)] = 0
                with search.zeroing(model, mask):
                    col = task.subset_row(model, batch_size=eval_batch_size)
            pending[(int(ids[t.k]), t.repeat)] = (t.units, t.flipped, col)
            bar.update(1)
            if len(pending) >= group_size or time.monotonic() - last > 30:
                parts.add(pending)
                pending, last = {}, time.monotonic()
        parts.add(pending)
    except KeyboardInterrupt:
        parts.add(pending)
        raise
    finally:
        bar.close()


def _result(parts, ids, is_noisy, given, status, repeats, structure, refs, max_units, config, subsets) -> Result:
    k = len(ids)
    missing = [(int(e), r) for e, st in zip(ids, status) if st == 0 for r in range(repeats)
               if (int(e), r) not in parts.done]
    if missing:
        raise MemlocError(f"{len(missing)} searches are missing from the saved parts (first: example {missing[0][0]}, "
                          f"repeat {missing[0][1]}); run the same command again to finish them")
    rows, n_units, flipped = [], np.zeros((k, repeats), np.int32), np.zeros((k, repeats), bool)
    col = np.full((k, repeats, len(subsets)), np.nan)
    for i, example in enumerate(ids):
        for r in range(repeats):
            units, f, c = parts.done.get((int(example), r), (np.zeros(0, np.int64), False, col[i, r]))
            rows.append(units)
            n_units[i, r], flipped[i, r], col[i, r] = len(units), f, c
    flat, offsets = csr(rows)
    sizes = np.array([s.size for s in structure.spaces], dtype=np.int64)
    count = np.where(flipped, n_units, max_units + 1).mean(1) if repeats else np.full(k, np.nan)
    ds = xr.Dataset(
        {"is_noisy": ("example", is_noisy[ids]), "label": ("example", given[ids].astype(np.int64)),
         "status": ("example", status), "neuron_count": ("example", np.where(status == 0, count, np.nan)),
         "n_units": (("example", "repeat"), n_units), "flipped": (("example", "repeat"), flipped),
         "layer_hist": (("example", "repeat", "layer"), layer_histogram(flat, offsets, sizes).reshape(k, repeats, len(sizes))),
         "collateral": (("example", "repeat", "subset"), col),
         "unit_ids": ("zeroed", flat), "unit_offsets": ("row", offsets),
         "layer_size": ("layer", sizes),
         "layer_offset": ("layer", np.array([s.offset for s in structure.spaces], dtype=np.int64)),
         "reference": (("repeat", "ref"), np.asarray(refs, dtype=np.int64))},
        coords={"example": np.asarray(ids, dtype=np.int64), "repeat": np.arange(repeats),
                "layer": [s.name for s in structure.spaces], "subset": list(subsets)})
    return Result("flip", ds, config=config)
