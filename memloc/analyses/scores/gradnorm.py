"""Per-example gradient norms (GraNd) in one forward and one backward pass per batch.

Per-layer norm tricks from each parameter-owning module's input and output gradient (Linear:
||a||^2 ||g||^2, Conv2d: per-example unfold product or grouped convolution, BatchNorm in eval mode:
per-channel sums, Embedding: the output gradients summed per example and token id; any other module:
a per-example ``torch.func`` VJP of that module alone), checked against ``torch.func.vmap`` and a
one-backward-per-example loop in the tests.

The per-example loss is a classifier's cross-entropy by default (:func:`classifier_loss`); ``loss=``
takes another, e.g. a language model's suffix loss (:class:`memloc.analyses.scores.tasks.SuffixLoss`).
An embedding whose lookup does not carry the batch (a language model's position embedding, shared
by every sequence of the batch) has its output expanded to the batch during the pass, so that each
sequence's share of its gradient is seen (the forward values are unchanged).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import MemlocError
from ...core.evaluate import eval_mode
from ...core.runtime import progress
from ...core.units import Hooks

__all__ = ["grad_norms", "batch_grad_norms", "GRAD_NORM_METHODS", "classifier_loss"]


def classifier_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, call=None) -> torch.Tensor:
    """(B,) cross-entropy of a classifier's logits ``model(x)`` for labels ``y`` (``call``: how to run the
    model, e.g. a ``torch.func.functional_call``; default ``model`` itself)."""
    return F.cross_entropy((model if call is None else call)(x), y, reduction="none")


def grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str = "hooks",
               batch_size: int = 256, loss=None) -> np.ndarray:
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
    loss : ``loss(model, x, y, call=None)`` -> (B,) per-example losses (default :func:`classifier_loss`;
        ``call(*args, **kwargs)`` runs the model when given).

    Returns
    -------
    (N,) float64 numpy array.
    """
    batches = ((x[s:s + batch_size], y[s:s + batch_size])
               for s in progress(range(0, len(y), batch_size), desc=f"grand ({method})", unit="batch"))
    return batch_grad_norms(model, batches, method=method, loss=loss)


def batch_grad_norms(model: nn.Module, batches: Iterable, *, method: str = "hooks", loss=None) -> np.ndarray:
    """:func:`grad_norms` over ``(x, y, ...)`` batches (e.g. :meth:`memloc.core.data.ExampleSet.batches`),
    concatenated in order: the same values as :func:`grad_norms` on the same batches."""
    if not isinstance(method, str) or method not in GRAD_NORM_METHODS:
        raise MemlocError(f"unknown gradient-norm method {method!r}; valid: {', '.join(GRAD_NORM_METHODS)}")
    if not any(p.requires_grad for p in model.parameters()):
        raise MemlocError("the model has no trainable parameters")
    fn, loss = GRAD_NORM_METHODS[method], classifier_loss if loss is None else loss
    tied = _tied(model) if method == "hooks" else None
    if tied:        # a per-layer norm would count each module's share of the gradient apart
        warnings.warn(f"{tied} is shared by several modules (tied weights): gradient norms one example at a "
                      "time (grad_method='loop')", stacklevel=2)
        fn = _loop_sq
    with eval_mode(model):
        sq = [fn(model, batch[0], batch[1], loss) for batch in batches]
    return torch.cat(sq).sqrt().cpu().numpy() if sq else np.zeros(0)


def _tied(model: nn.Module) -> str | None:
    """The name of a trainable parameter that two modules own (tied weights), or None."""
    owner: dict[int, str] = {}
    for name, m in model.named_modules():
        for k, p in _trainable(m, recurse=False).items():
            if id(p) in owner:
                return f"parameter {owner[id(p)]!r}"
            owner[id(p)] = f"{name}.{k}" if name else k
    return None


def _trainable(module: nn.Module, recurse: bool = True) -> dict[str, torch.Tensor]:
    return {k: p for k, p in module.named_parameters(recurse=recurse) if p.requires_grad}


def _sq_norms(grads, batch: bool) -> torch.Tensor:
    """Sum of squared entries of each gradient tensor, in float64 (per row if ``batch``)."""
    return sum(g.double().flatten(1 if batch else 0).pow(2).sum(-1) for g in grads if g is not None)


def _loop_sq(model, x, y, loss_fn):
    params = list(_trainable(model).values())
    out = []
    for i in range(len(y)):
        loss = loss_fn(model, x[i:i + 1], y[i:i + 1]).sum()
        out.append(_sq_norms(torch.autograd.grad(loss, params, allow_unused=True), batch=False))
    return torch.stack(out)


def _vmap_sq(model, x, y, loss_fn):
    from torch.func import functional_call, grad, vmap
    params = {k: p.detach() for k, p in _trainable(model).items()}
    fixed = {**{k: p for k, p in model.named_parameters() if not p.requires_grad}, **dict(model.named_buffers())}

    def loss_one(p, xi, yi):
        def call(*args, **kwargs):
            return functional_call(model, {**p, **fixed}, args, kwargs)
        return loss_fn(model, xi[None], yi[None], call=call).sum()

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
    shared: str | None = None   # an embedding lookup without the batch, its output expanded: "new" / "dim0" axis

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


def _layernorm_sq(m: nn.LayerNorm, call: _Call):
    a, g = call.args[0], call.grads[0]
    if a.ndim < 2 or a.shape[0] != g.shape[0]:
        return None
    k = len(m.normalized_shape)
    xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    per = lambda t: t.reshape(t.shape[0], -1, *t.shape[t.ndim - k:]).sum(1).flatten(1).pow(2).sum(1)
    return {"weight": per(g * xhat), "bias": per(g)}


def _embedding_sq(m: nn.Embedding, call: _Call):
    """Per example: the output gradients summed per token id, squared (rows of one id share a gradient)."""
    if m.max_norm is not None or m.scale_grad_by_freq or len(call.args) != 1:
        return None
    idx, g = call.args[0], call.grads[0]
    n = g.shape[0]
    if call.shared == "new":
        idx = idx.expand(n, *idx.shape)
    elif call.shared == "dim0":
        idx = idx.expand(n, *idx.shape[1:])
    idx, g = idx.reshape(n, -1), g.reshape(n, -1, g.shape[-1])
    if m.padding_idx is not None:
        g = g * (idx != m.padding_idx).unsqueeze(-1).to(g.dtype)
    keys, inverse = torch.unique(torch.arange(n, device=idx.device)[:, None] * m.num_embeddings + idx,
                                 return_inverse=True)
    sums = torch.zeros(len(keys), g.shape[-1], dtype=g.dtype, device=g.device).index_add_(
        0, inverse.reshape(-1), g.reshape(-1, g.shape[-1]))
    w = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, keys // m.num_embeddings, sums.pow(2).sum(1))
    return {"weight": w}


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
        (grads,) = fn(tuple(c if call.shared == "new" else c[None] for c in cot))
        return _sq_norms(grads.values(), batch=False)

    arg_dims = tuple(batched(a) for a in call.args)
    kw_dims = {k: batched(v) for k, v in call.kwargs.items()}
    if call.shared is not None:     # the same inputs for every example; its expanded output carries the batch
        arg_dims, kw_dims = tuple(None for _ in call.args), {k: None for k in call.kwargs}
    if any(o.ndim == 0 or o.shape[0] != n for o in call.outs) or (
            call.shared is None and 0 not in (*arg_dims, *kw_dims.values())):
        raise MemlocError(f"module {name!r} ({type(m).__name__}) does not keep the batch on dim 0; "
                         "use {grad_method}", options={"grad_method": "vmap"})
    return {"*": vmap(one, in_dims=(arg_dims, kw_dims, 0))(call.args, call.kwargs, cots)}


# exact types: subclasses may change forward (e.g. timm's BatchNormAct2d applies its activation)
_NORM_RULES = {nn.Linear: _linear_sq, nn.Conv2d: _conv2d_sq, nn.BatchNorm1d: _batchnorm_sq,
               nn.BatchNorm2d: _batchnorm_sq, nn.BatchNorm3d: _batchnorm_sq, nn.LayerNorm: _layernorm_sq,
               nn.Embedding: _embedding_sq}


def _shared_lookup(module, args, kwargs, x) -> str | None:
    """How an embedding's lookup lacks the batch of ``x`` (the model's input): ``"new"`` (indices of fewer
    dimensions than ``x``, e.g. positions (T,) of (B, T) tokens), ``"dim0"`` (a leading 1 for a batch of
    more), None (one lookup per example)."""
    idx = args[0] if len(args) == 1 and not kwargs else None
    if not isinstance(module, nn.Embedding) or not torch.is_tensor(idx) or not torch.is_tensor(x) or idx.ndim == 0:
        return None
    n = x.shape[0]
    if idx.ndim < x.ndim:
        return "new"
    return "dim0" if idx.shape[0] == 1 != n else None


def _hooks_sq(model, x, y, loss_fn):
    owners = {name: m for name, m in model.named_modules() if _trainable(m, recurse=False)}
    calls: dict[str, list[_Call]] = {name: [] for name in owners}

    def hook_for(name):
        def hook(module, args, kwargs, output):
            shared = _shared_lookup(module, args, kwargs, x)
            if shared is not None:      # the same rows for every example: each example gets its own copy
                output = output.expand(len(x), *(output.shape if shared == "new" else output.shape[1:]))
            outs = _float_tensors(output)
            call = _Call(args, kwargs, outs, [None] * len(outs),
                         [t._version for t in _float_tensors((args, kwargs))], shared)
            for i, o in enumerate(outs):
                if o.requires_grad:  # fires with the gradient of the value before any in-place op
                    o.register_hook(lambda g, i=i, call=call: call.store(i, g.detach()))
            calls[name].append(call)
            return output if shared is not None else None
        return hook

    try:
        with Hooks() as hooks:
            for name, m in owners.items():
                hooks.forward(m, hook_for(name), with_kwargs=True)
            loss = loss_fn(model, x, y).sum()  # sum: each example's own gradient
            # the output-gradient hooks fire during this backward (its batch-summed result is unused)
            torch.autograd.grad(loss, [p for m in owners.values() for p in _trainable(m, False).values()],
                                allow_unused=True)
        with torch.no_grad():  # torch.func transforms inside still differentiate
            return _combine(owners, calls, len(y), y.device)
    finally:
        # an output holds its gradient hook, the hook its call, the call the output: a cycle through
        # autograd's C++ side that Python's collector cannot free (each batch's activations leaked)
        for call in (c for cs in calls.values() for c in cs):
            call.args, call.kwargs, call.outs, call.grads = (), {}, [], []


def _combine(owners, calls, n, device):
    """Sum over parameter-owning modules of their per-example squared gradient norms."""
    total = torch.zeros(n, dtype=torch.float64, device=device)
    for name, m in owners.items():
        if len(calls[name]) > 1:
            raise MemlocError(f"module {name!r} runs {len(calls[name])} times per forward pass; "
                             "per-layer gradient norms cannot be combined: use {grad_method}", options={"grad_method": "vmap"})
        if not calls[name] or all(g is None for g in calls[name][0].grads):
            continue  # unused by this forward: zero gradient
        call = calls[name][0]
        call.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in call.args)
        if [t._version for t in _float_tensors((call.args, call.kwargs))] != call.versions:
            raise MemlocError(f"the input of module {name!r} is modified in place later in the forward "
                             "pass; use {grad_method}", options={"grad_method": "vmap"})
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
