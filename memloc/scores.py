"""Per-example memorisation / label-noise scores of a run.

``python -m memloc.scores RUN [--scores all|NAME,...] [--epoch-k K]`` writes ``RUN/results/scores.h5``.

Every score is a pure function (arrays in, arrays out) registered in :data:`SCORES` with its
**direction**: ``+1`` if a higher raw value means "more likely mislabeled / memorised", ``-1`` if
a lower one does. Raw values are stored; a detector ranks by ``direction * score``.

=============  ====  =========================================================================
name           dir   definition (dynamics of ``run.h5``; p = probability of the *given* label)
=============  ====  =========================================================================
final_loss     +1    cross-entropy at the end of training (final checkpoint, eval mode)
confidence     -1    mean over epochs of p at presentation, p = exp(-loss) (Swayamdipta et
                     al. 2020, dataset cartography: training-time forward passes)
variability    +1    population std over epochs of that p (cartography); memorised noisy
                     labels climb from p ~ 0 to p ~ 1, easy clean ones sit at p ~ 1
forgetting     +1    forgetting events (Toneva et al. 2019): 1 -> 0 transitions of correctness
                     between consecutive presentations; never-learned examples get the number
                     of epochs, more than any learned example can reach (ranked most forgettable)
el2n           +1    ||softmax(f(x)) - onehot(y)||_2 with the checkpoint of epoch k (Paul et al.
                     2021; one run, no averaging over seeds)
grand          +1    per-example norm of the loss gradient over all trainable parameters with the
                     checkpoint of epoch k, eval mode (Paul et al. 2021)
aum            -1    area under the margin (Pleiss et al. 2020): mean over presentations of the
                     given-label logit minus the largest other logit
neuron_count   -1    mean over repeats of the units zeroed until the prediction flipped
                     (``results/flip.h5``; not flipped = max_units + 1); NaN where not searched
                     or misclassified (Maini et al. 2023: memorised examples flip with fewer units)
=============  ====  =========================================================================

Epoch k (``--epoch-k``) defaults to 10% of training (at least 1), as Paul et al. score at epoch
20 of 200. On the MNIST-5k runs (one-cycle schedule, 10% noise) EL2N's AUROC is 0.99 at epochs
3-6 (MLP) and 0.98-1.00 at epochs 4-15 (lenet) and falls once noisy labels are being memorised.
GraNd's per-example norms are computed in one forward and one backward pass per batch from each
layer's input and output gradient (:func:`grad_norms`, ``--grad-method``).

``scores.h5``: root attrs (config: epoch_k, scores, grand_method, ...); ``/examples/index``
(N,); ``/scores/<name>`` (N,) float64, dims ``["example"]``, attrs ``description``,
``direction`` (and ``epoch`` for el2n / grand). The file is replaced by every call.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from typing import Callable

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cli
from .cli import UserError
from .h5 import atomic_h5, put, read_config, write_root_attrs
from .run import Run, load

__all__ = ["final_loss", "confidence", "variability", "forgetting_events", "el2n", "aum",
           "neuron_count", "grad_norms", "GRAD_NORM_METHODS", "Score", "SCORES", "default_epoch_k",
           "compute_scores", "read_scores", "parse_args", "main"]


# ------------------------------------------------------------------ pure score functions
def final_loss(loss: np.ndarray) -> np.ndarray:
    """Loss at the last epoch. ``loss``: (epoch, N) epoch-end losses -> (N,)."""
    return np.asarray(loss, dtype=np.float64)[-1]


def _probabilities(loss: np.ndarray) -> np.ndarray:
    return np.exp(-np.asarray(loss, dtype=np.float64))


def confidence(loss: np.ndarray) -> np.ndarray:
    """Cartography confidence: mean over epochs of p = exp(-loss). (epoch, N) -> (N,); NaN = not seen."""
    with _quiet_nan():
        return np.nanmean(_probabilities(loss), axis=0)


def variability(loss: np.ndarray) -> np.ndarray:
    """Cartography variability: population std over epochs of p = exp(-loss). (epoch, N) -> (N,)."""
    with _quiet_nan():
        return np.nanstd(_probabilities(loss), axis=0)


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Toneva forgetting events. ``correct``: (presentation, N) of 1 / 0 (-1 = not presented).

    Returns (N,) float: the number of 1 -> 0 transitions between consecutive presentations
    (skipping -1 entries); an example never correct at any presentation gets the number of rows
    (strictly more than any learned example can have), one never presented gets NaN.
    """
    c = np.asarray(correct)
    seen = c >= 0
    out = ((c[:-1] == 1) & (c[1:] == 0)).sum(axis=0).astype(np.float64)
    for j in np.flatnonzero(~seen.all(axis=0)):  # columns with gaps: compare presented rows only
        col = c[seen[:, j], j]
        out[j] = float(((col[:-1] == 1) & (col[1:] == 0)).sum()) if len(col) else np.nan
    never = ~(c == 1).any(axis=0) & seen.any(axis=0)
    out[never] = c.shape[0]
    return out


def el2n(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """EL2N: ||softmax(logits) - onehot(labels)||_2. logits (N, C), labels (N,) -> (N,)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    err = z.softmax(1) - F.one_hot(y, z.shape[1]).to(z.dtype)
    return err.norm(dim=1).numpy()


def aum(margin: np.ndarray) -> np.ndarray:
    """Area under the margin: mean over presentations of the margin. (presentation, N) -> (N,)."""
    with _quiet_nan():
        return np.nanmean(np.asarray(margin, dtype=np.float64), axis=0)


def neuron_count(index, status, n_units, flipped, *, num_examples: int, max_units: int) -> np.ndarray:
    """Neuron-count score from a flip search (schema of ``results/flip.h5``).

    ``index`` (K,) example ids, ``status`` (K,) 0 = searched, ``n_units`` / ``flipped`` (K, R).
    Returns (num_examples,): mean over repeats of ``n_units``, counting a search that did not flip
    as ``max_units + 1``; NaN for examples not searched or with status != 0.
    """
    index, status = np.asarray(index, dtype=np.int64), np.asarray(status)
    counts = np.where(np.asarray(flipped, dtype=bool), np.asarray(n_units, dtype=np.float64), max_units + 1.0)
    out = np.full(num_examples, np.nan)
    ok = status == 0
    out[index[ok]] = counts[ok].mean(axis=1)
    return out


@contextlib.contextmanager
def _quiet_nan():
    """Silence numpy's 'mean of empty slice' warnings (all-NaN columns give NaN, as intended)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ------------------------------------------------------------------ GraNd: per-example gradient norms
def grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str = "hooks",
               batch_size: int = 256) -> np.ndarray:
    """Per-example gradient norms ||d CE(f(x_i), y_i) / d theta||_2 over all trainable parameters.

    The model is evaluated in eval mode (batch norm uses its running statistics, so examples do
    not interact; the training flag is restored afterwards; weights are never modified).

    Parameters
    ----------
    model : the classifier; x : (N, ...) inputs and y : (N,) labels on the model's device.
    method : ``hooks`` (default: per-layer norm tricks from each layer's input and output
        gradient -- Linear: ||a||^2 ||g||^2, Conv2d: per-example unfold product, BatchNorm in eval
        mode: per-channel sums; any other parameter-owning module: a per-example ``torch.func``
        VJP of that module alone), ``vmap`` (``torch.func.vmap(grad(...))`` of the whole model:
        materialises every per-example gradient) or ``loop`` (one backward per example).
    batch_size : examples per vectorised pass.

    Returns
    -------
    (N,) float64 numpy array.
    """
    if method not in GRAD_NORM_METHODS:
        raise ValueError(f"unknown gradient-norm method {method!r}; valid: {', '.join(GRAD_NORM_METHODS)}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    fn = GRAD_NORM_METHODS[method]
    was_training = model.training
    model.eval()
    try:
        sq = [fn(model, x[s:s + batch_size], y[s:s + batch_size])
              for s in cli.progress(range(0, len(y), batch_size), desc=f"grand ({method})", unit="batch")]
    finally:
        model.train(was_training)
    return torch.cat(sq).sqrt().cpu().numpy() if sq else np.zeros(0)


def _trainable(module: nn.Module, recurse: bool = True) -> dict[str, torch.Tensor]:
    return {k: p for k, p in module.named_parameters(recurse=recurse) if p.requires_grad}


def _sq_norms(grads, batch: bool) -> torch.Tensor:
    """Sum of squared entries of each gradient tensor, in float64 (per row if ``batch``)."""
    return sum(g.double().flatten(1 if batch else 0).pow(2).sum(-1) for g in grads if g is not None)


def _loop_sq(model, x, y):
    params = list(_trainable(model).values())
    out = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        out.append(_sq_norms(torch.autograd.grad(loss, params, allow_unused=True), batch=False))
    return torch.stack(out)


def _vmap_sq(model, x, y):
    from torch.func import functional_call, grad, vmap
    params = {k: p.detach() for k, p in _trainable(model).items()}
    fixed = {**{k: p for k, p in model.named_parameters() if not p.requires_grad}, **dict(model.named_buffers())}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, {**p, **fixed}, (xi[None],)), yi[None])

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return _sq_norms(grads.values(), batch=True)


def _float_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _float_tensors(o)]
    return []


@dataclass
class _Call:
    """One forward call of a parameter-owning module: inputs, outputs and output gradients."""

    args: tuple
    kwargs: dict
    outs: list
    grads: list
    versions: list

    def store(self, i, g):
        self.grads[i] = g


def _linear_sq(m: nn.Linear, call: _Call):
    a, g = call.args[0], call.grads[0]
    if a.ndim == 2:
        gg = g.pow(2).sum(1)
        return {"weight": a.pow(2).sum(1) * gg, "bias": gg}
    a, g = a.flatten(1, -2), g.flatten(1, -2)  # (B, T, in), (B, T, out)
    t, n_in, n_out = a.shape[1], a.shape[2], g.shape[2]
    if t * (n_in + n_out) < n_in * n_out:  # Gram ("ghost") trick is cheaper than materialising
        w = ((a @ a.mT) * (g @ g.mT)).sum((1, 2))
    else:
        w = torch.einsum("bti,bto->boi", a, g).pow(2).sum((1, 2))
    return {"weight": w, "bias": g.sum(1).pow(2).sum(1)}


def _conv2d_sq(m: nn.Conv2d, call: _Call):
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return None
    a, g = call.args[0], call.grads[0]
    b, groups, length = a.shape[0], m.groups, g.shape[2] * g.shape[3]
    n_in, n_out = m.weight[0].numel(), m.out_channels // groups      # per group: Cin/G * kh * kw, Cout/G
    if length * (n_in + n_out) < n_in * n_out:
        # few positions: Gram trick, ||sum_l d_l u_l^T||^2 = sum_{l,l'} (d_l . d_l')(u_l . u_l')
        u = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        u, d = u.reshape(b, groups, n_in, length), g.reshape(b, groups, n_out, length)
        w = ((u.mT @ u) * (d.mT @ d)).sum((1, 2, 3))
    else:
        # all per-example weight gradients at once: one convolution with B * groups groups
        w = torch.nn.grad.conv2d_weight(a.reshape(1, -1, *a.shape[2:]), (b * m.out_channels, *m.weight.shape[1:]),
                                        g.reshape(1, -1, *g.shape[2:]), stride=m.stride, padding=m.padding,
                                        dilation=m.dilation, groups=b * groups).reshape(b, -1).pow(2).sum(1)
    return {"weight": w, "bias": g.sum((2, 3)).pow(2).sum(1)}


def _batchnorm_sq(m: nn.modules.batchnorm._BatchNorm, call: _Call):
    if m.training or m.running_mean is None:
        return None
    a, g = call.args[0], call.grads[0]
    shape = [1, -1] + [1] * (a.ndim - 2)
    xhat = (a - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)
    b, c = a.shape[:2]
    return {"weight": (g * xhat).reshape(b, c, -1).sum(2).pow(2).sum(1),
            "bias": g.reshape(b, c, -1).sum(2).pow(2).sum(1)}


def _generic_sq(m: nn.Module, call: _Call, n: int, name: str):
    """Per-example VJP of this module alone w.r.t. its own parameters (torch.func).

    Needs the batch on dim 0 of every output and of at least one input.
    """
    from torch.func import functional_call, vjp, vmap
    params = {k: p.detach() for k, p in _trainable(m, recurse=False).items()}
    cots = [torch.zeros_like(o) if gr is None else gr for o, gr in zip(call.outs, call.grads)]

    def batched(v):
        return 0 if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else None

    def one(args, kwargs, cot):
        args = tuple(a[None] if batched_dim == 0 else a for a, batched_dim in zip(args, arg_dims))
        kwargs = {k: v[None] if kw_dims[k] == 0 else v for k, v in kwargs.items()}
        _, fn = vjp(lambda p: tuple(_float_tensors(functional_call(m, p, args, kwargs))), params)
        (grads,) = fn(tuple(c[None] for c in cot))
        return _sq_norms(grads.values(), batch=False)

    arg_dims = tuple(batched(a) for a in call.args)
    kw_dims = {k: batched(v) for k, v in call.kwargs.items()}
    if any(o.ndim == 0 or o.shape[0] != n for o in call.outs) or 0 not in (*arg_dims, *kw_dims.values()):
        raise ValueError(f"module {name!r} ({type(m).__name__}) does not keep the batch on dim 0; "
                         "use method 'vmap'")
    return {"*": vmap(one, in_dims=(arg_dims, kw_dims, 0))(call.args, call.kwargs, cots)}


# exact types: subclasses may change forward (e.g. timm's BatchNormAct2d applies its activation)
_NORM_RULES = {nn.Linear: _linear_sq, nn.Conv2d: _conv2d_sq, nn.BatchNorm1d: _batchnorm_sq,
               nn.BatchNorm2d: _batchnorm_sq, nn.BatchNorm3d: _batchnorm_sq}


def _hooks_sq(model, x, y):
    owners = {name: m for name, m in model.named_modules() if _trainable(m, recurse=False)}
    calls: dict[str, list[_Call]] = {name: [] for name in owners}

    def hook_for(name):
        def hook(module, args, kwargs, output):
            outs = _float_tensors(output)
            call = _Call(args, kwargs, outs, [None] * len(outs),
                         [t._version for t in _float_tensors((args, kwargs))])
            for i, o in enumerate(outs):
                if o.requires_grad:  # fires with the gradient of the value before any in-place op
                    o.register_hook(lambda g, i=i, call=call: call.store(i, g.detach()))
            calls[name].append(call)
        return hook

    handles = [m.register_forward_hook(hook_for(name), with_kwargs=True) for name, m in owners.items()]
    try:
        loss = F.cross_entropy(model(x), y, reduction="sum")  # sum: each example's own gradient
        # the output-gradient hooks fire during this backward (its batch-summed result is unused)
        torch.autograd.grad(loss, [p for m in owners.values() for p in _trainable(m, False).values()],
                            allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():  # torch.func transforms inside still differentiate
        return _combine(owners, calls, len(y), y.device)


def _combine(owners, calls, n, device):
    """Sum over parameter-owning modules of their per-example squared gradient norms."""
    total = torch.zeros(n, dtype=torch.float64, device=device)
    for name, m in owners.items():
        if len(calls[name]) > 1:
            raise ValueError(f"module {name!r} runs {len(calls[name])} times per forward pass; "
                             "per-layer gradient norms cannot be combined: use method 'vmap'")
        if not calls[name] or all(g is None for g in calls[name][0].grads):
            continue  # unused by this forward: zero gradient
        call = calls[name][0]
        call.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in call.args)
        if [t._version for t in _float_tensors((call.args, call.kwargs))] != call.versions:
            raise ValueError(f"the input of module {name!r} is modified in place later in the forward "
                             "pass; use method 'vmap'")
        rule = _NORM_RULES.get(type(m))
        parts = rule(m, call) if rule is not None else None
        if parts is None:
            parts = _generic_sq(m, call, n, name)
        else:
            trainable = _trainable(m, recurse=False)
            parts = {k: v for k, v in parts.items() if k in trainable}
        total += sum(v.double() for v in parts.values())
    return total


GRAD_NORM_METHODS: dict[str, Callable] = {"hooks": _hooks_sq, "vmap": _vmap_sq, "loop": _loop_sq}


# ------------------------------------------------------------------ from a run
class _Inputs:
    """What the scores read from a run (loaded lazily, cached)."""

    def __init__(self, run: Run, *, epoch_k: int, device, batch_size: int, grad_method: str):
        self.run, self.epoch_k, self.device = run, epoch_k, device
        self.batch_size, self.grad_method = batch_size, grad_method
        self._cache: dict = {}

    def presentation(self, name: str) -> np.ndarray:
        """(epoch, N) presentation dynamics without the initialisation row."""
        return self.run.dynamics(name, "presentation")[1:]

    def train(self):
        if "train" not in self._cache:
            train = self.run.data(self.device).train
            if not torch.equal(train.idx.cpu(), torch.arange(len(train))):
                raise UserError("the run's training set does not list its examples in id order")
            self._cache["train"] = train
        return self._cache["train"]

    def model_k(self) -> nn.Module:
        return self.run.model(self.epoch_k, device=self.device)

    @torch.no_grad()
    def logits_k(self) -> np.ndarray:
        model = self.model_k()
        return torch.cat([model(x).double().cpu() for x, _, _ in self.train().batches(self.batch_size)]).numpy()


def _flip_path(run: Run):
    return run.results_path("flip")


def _neuron_count_from_run(inp: _Inputs) -> np.ndarray:
    path = _flip_path(inp.run)
    if not path.is_file():
        raise UserError(f"neuron_count needs {str(path)!r}: run `python -m memloc.flip {inp.run.path}` first")
    try:
        with h5py.File(path, "r") as f:
            cfg = read_config(f)
            ex = f["examples"]
            arrays = [ex[k][:] for k in ("index", "status", "n_units", "flipped")]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the flip results {str(path)!r}: {e}") from None
    if "max_units" not in cfg:
        raise UserError(f"{str(path)!r} does not record max_units in its config")
    index = arrays[0]
    if len(index) and (index.min() < 0 or index.max() >= inp.run.num_train):
        raise UserError(f"{str(path)!r} lists example ids outside 0..{inp.run.num_train - 1}")
    return neuron_count(*arrays, num_examples=inp.run.num_train, max_units=int(cfg["max_units"]))


@dataclass(frozen=True)
class Score:
    """A registered score: the pure function, how to feed it from a run, its direction."""

    func: Callable
    from_run: Callable[[_Inputs], np.ndarray]
    direction: int          # +1: higher = more likely noisy; -1: lower = more likely noisy
    description: str
    at_epoch_k: bool = False


SCORES: dict[str, Score] = {
    "final_loss": Score(final_loss, lambda i: final_loss(i.run.dynamics("loss", "end")), +1,
                        "cross-entropy of the given label at the end of training (final checkpoint, eval mode)"),
    "confidence": Score(confidence, lambda i: confidence(i.presentation("loss")), -1,
                        "cartography confidence: mean over epochs of p(given label) at presentation"),
    "variability": Score(variability, lambda i: variability(i.presentation("loss")), +1,
                         "cartography variability: std over epochs of p(given label) at presentation"),
    "forgetting": Score(forgetting_events, lambda i: forgetting_events(i.presentation("correct")), +1,
                        "forgetting events (1 -> 0 between consecutive presentations); "
                        "never learned = number of epochs"),
    "el2n": Score(el2n, lambda i: el2n(i.logits_k(), i.run.label_given), +1,
                  "EL2N: ||softmax - onehot(given label)||_2 at epoch k", at_epoch_k=True),
    "grand": Score(grad_norms, lambda i: grad_norms(i.model_k(), i.train().x, i.train().y, method=i.grad_method,
                                                     batch_size=i.batch_size), +1,
                   "GraNd: per-example loss-gradient norm over all parameters at epoch k (eval mode)",
                   at_epoch_k=True),
    "aum": Score(aum, lambda i: aum(i.presentation("margin")), -1,
                 "area under the margin: mean over presentations of given-label logit minus largest other"),
    "neuron_count": Score(neuron_count, _neuron_count_from_run, -1,
                          "units zeroed until the prediction flips (mean over repeats; not flipped = "
                          "max_units + 1; NaN = not searched)"),
}


def default_epoch_k(final_epoch: int) -> int:
    """Epoch of the EL2N / GraNd checkpoint: 10% of training (Paul et al. use epoch 20 of 200), >= 1."""
    return max(1, min(final_epoch, round(0.1 * final_epoch)))


def _select(names, run: Run) -> list[str]:
    if names in (None, "all", ["all"]):
        return [n for n in SCORES if n != "neuron_count" or _flip_path(run).is_file()]
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    bad = [n for n in names if n not in SCORES]
    if bad or not names:
        raise UserError(f"unknown score {', '.join(map(repr, bad)) or '(none given)'}; "
                        f"valid: all, {', '.join(SCORES)}")
    return list(dict.fromkeys(names))


def compute_scores(run: Run, names="all", *, epoch_k: int | None = None, device="cpu",
                   batch_size: int = 256, grad_method: str = "hooks") -> dict[str, np.ndarray]:
    """Scores of every training example of ``run``: ``{name: (N,) float64}``.

    ``names``: ``"all"`` (every score whose inputs exist: neuron_count only with a flip result) or
    a list / comma-separated string of names of :data:`SCORES`.
    """
    names = _select(names, run)
    epoch_k = default_epoch_k(run.final_epoch) if epoch_k is None else int(epoch_k)
    if grad_method not in GRAD_NORM_METHODS:
        raise UserError(f"unknown gradient-norm method {grad_method!r}; valid: {', '.join(GRAD_NORM_METHODS)}")
    inp = _Inputs(run, epoch_k=epoch_k, device=cli.resolve_device(device), batch_size=batch_size,
                  grad_method=grad_method)
    out = {}
    for name in names:
        values = np.asarray(SCORES[name].from_run(inp), dtype=np.float64)
        assert values.shape == (run.num_train,), (name, values.shape)
        out[name] = values
    return out


def read_scores(path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict]]:
    """``scores.h5`` -> (index (N,), {name: values (N,)}, {name: attrs (direction, description...)})."""
    try:
        with h5py.File(path, "r") as f:
            index = f["examples/index"][:]
            order = sorted(f["scores"], key=lambda k: (list(SCORES).index(k) if k in SCORES else len(SCORES), k))
            values = {k: f["scores"][k][:] for k in order}
            attrs = {k: {a: (v.item() if hasattr(v, "item") else v) for a, v in f["scores"][k].attrs.items()
                         if a != "dims"} for k in order}
    except (OSError, KeyError) as e:
        raise UserError(f"cannot read scores {str(path)!r}: {e}") from None
    return index, values, attrs


# ------------------------------------------------------------------ CLI
def parse_args(argv=None):
    p = cli.parser("memloc.scores", "Per-example memorisation / label-noise scores of a run, written to "
                   "RUN/results/scores.h5 (raw values plus each score's direction: +1 = higher means "
                   "more likely mislabeled, -1 = lower does).")
    p.add_argument("run", help="run directory (made by memloc.train)")
    p.add_argument("--scores", default="all",
                   help="comma-separated score names, or 'all' (neuron_count only if results/flip.h5 "
                        f"exists); names: {', '.join(SCORES)}")
    p.add_argument("--epoch-k", type=int, default=None,
                   help="checkpoint epoch of el2n and grand (default: 10%% of training, at least 1)")
    p.add_argument("--grad-method", default="hooks", choices=list(GRAD_NORM_METHODS),
                   help="per-example gradient norms for grand: hooks = per-layer norm tricks, "
                        "vmap = torch.func over the whole model, loop = one backward per example")
    p.add_argument("--batch-size", type=int, default=256, help="examples per forward pass (el2n, grand)")
    cli.add_device_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors("memloc.scores"):
        cli.check_positive(args, "batch_size")
        run = load(args.run)
        names = _select(args.scores, run)
        epoch_k = default_epoch_k(run.final_epoch) if args.epoch_k is None else args.epoch_k
        if not 0 <= epoch_k <= run.final_epoch:
            raise UserError(f"--epoch-k must be between 0 and {run.final_epoch}, got {epoch_k}")
        if "neuron_count" not in names and args.scores == "all":
            print(f"memloc.scores: no {_flip_path(run)}; neuron_count skipped")
        values = compute_scores(run, names, epoch_k=epoch_k, device=args.device, batch_size=args.batch_size,
                                grad_method=args.grad_method)
        path = run.results_path("scores")
        config = {"epoch_k": epoch_k, "scores": names, "grad_method": args.grad_method,
                  "batch_size": args.batch_size, "device": args.device}
        with atomic_h5(path) as f:
            write_root_attrs(f, "memloc.scores", config, argv)
            put(f.create_group("examples"), "index", np.arange(run.num_train), dims=["example"])
            g = f.create_group("scores")
            for name, v in values.items():
                s = SCORES[name]
                extra = {"epoch": epoch_k} if s.at_epoch_k else {}
                put(g, name, v, dims=["example"], description=s.description, direction=s.direction, **extra)
        for name, v in values.items():
            ok = np.isfinite(v)
            print(f"{name:<13} dir {SCORES[name].direction:+d}  defined {ok.sum():>6}/{len(v)}  "
                  f"mean {np.mean(v[ok]) if ok.any() else float('nan'):.4g}")
        print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
