"""Layers and units of any ``nn.Module`` classifier, found by tracing one forward pass.

* A **layer** is a weight-bearing module (conv, linear, embedding, attention) together with the
  normalisation module that directly consumes its output (the norm's input *is* the weight
  module's output tensor). Norms that follow nothing (pre-norm transformers) are layers of kind
  ``norm``; any parameter left over (e.g. a ViT's ``cls_token``) belongs to a layer of kind
  ``param`` named after its module. Every parameter belongs to exactly one layer.
* A **unit space** is the output of a conv (channels, NCHW dim 1) or linear layer (last dim);
  the layer producing the logits is excluded. Units are numbered globally: unit space ``s`` owns
  ids ``s.offset .. s.offset + s.size - 1``.
* :func:`unit_masks` multiplies those outputs by per-example masks through forward hooks (at
  the weight module's output, ``site="pre_norm"``, or its norm's output, ``site="post_norm"``);
  the hooks are always removed and a hook that never fired is an error. A language model's MLP
  neurons and attention heads (:func:`memloc.core.neurons.unit_structure`) are unit spaces at a
  module's *input* (``at="input"``, a forward pre-hook) whose units may span ``group`` features each.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .evaluate import eval_mode

__all__ = ["Layer", "UnitSpace", "Structure", "trace", "unit_masks", "HookNotFiredError", "eval_mode",
           "Hooks", "hooks_of", "SITES"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHT_TYPES = CONV_TYPES + (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.MultiheadAttention)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
SITES = ("pre_norm", "post_norm")


class HookNotFiredError(RuntimeError):
    """A mask was given for a module that the forward pass never called."""


@dataclass(frozen=True)
class Layer:
    """One layer: ``modules`` = (weight module, [norm]); ``params``/``buffers`` = state_dict keys."""

    name: str
    kind: str  # conv | linear | embedding | attention | norm | param
    modules: tuple[str, ...]
    params: tuple[str, ...]
    buffers: tuple[str, ...]
    numel: int

    @property
    def keys(self) -> tuple[str, ...]:
        """All state_dict keys of this layer (parameters, then buffers)."""
        return self.params + self.buffers


@dataclass(frozen=True)
class UnitSpace:
    """The units (channels / features) of one layer's output."""

    name: str            # the layer's name
    module: str          # module hooked at site pre_norm
    norm: str | None     # module hooked at site post_norm (None: same as pre_norm)
    size: int
    dim: int             # 1 for NCHW channels, -1 for last-dim features
    offset: int
    group: int = 1       # features per unit (an attention head: the head_dim features of its slice)
    at: str = "output"   # output: the module's output (forward hook); input: its first argument (pre-hook)

    def module_at(self, site: str) -> str:
        return self.norm if site == "post_norm" and self.norm else self.module


@dataclass
class Structure:
    """Layers and unit spaces of a model, in forward order."""

    layers: list[Layer]
    spaces: list[UnitSpace]
    n_units: int = field(init=False)

    def __post_init__(self):
        self.n_units = sum(s.size for s in self.spaces)

    @property
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]

    def layer(self, name: str) -> Layer:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"unknown layer {name!r}; valid: {', '.join(self.layer_names)}")

    def space(self, name: str) -> UnitSpace:
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(f"no unit space {name!r}; valid: {', '.join(s.name for s in self.spaces)}")

    def unit_space_index(self, unit_ids) -> torch.Tensor:
        """Index into ``spaces`` of each global unit id."""
        offsets = torch.tensor([s.offset for s in self.spaces])
        return torch.bucketize(torch.as_tensor(unit_ids), offsets, right=True) - 1

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a (..., n_units) tensor into ``{space name: (..., size)}`` views."""
        if flat.shape[-1] != self.n_units:
            raise ValueError(f"expected last dim {self.n_units} (total units), got {tuple(flat.shape)}")
        return {s.name: flat[..., s.offset:s.offset + s.size] for s in self.spaces}


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2's projections): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_weight(m: nn.Module) -> bool:
    return isinstance(m, WEIGHT_TYPES) or is_conv1d(m)


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, NORM_TYPES) or ("Norm" in type(m).__name__ and any(True for _ in m.parameters(False)))


def _kind(m: nn.Module) -> str:
    if isinstance(m, CONV_TYPES):
        return "conv"
    if isinstance(m, (nn.Linear, nn.Bilinear)) or is_conv1d(m):
        return "linear"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return "attention"


class Hooks:
    """The one place memloc adds hooks: every handle is kept and removed together.

    ``with Hooks() as h: h.forward(module, fn)`` removes them on leaving the block (also on error);
    a persistent owner (example-tied dropout) keeps the object and calls :meth:`remove`.
    """

    def __init__(self):
        self.handles: list = []

    def forward(self, module: nn.Module, fn, *, with_kwargs: bool = False):
        """``module.register_forward_hook(fn)``; returns the handle."""
        handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        self.handles.append(handle)
        return handle

    def forward_pre(self, module: nn.Module, fn):
        """``module.register_forward_pre_hook(fn)`` (``fn(module, args)`` may return new args); returns the handle."""
        handle = module.register_forward_pre_hook(fn)
        self.handles.append(handle)
        return handle

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


def trace(model: nn.Module, example_input: torch.Tensor) -> Structure:
    """Find the layers and unit spaces of ``model`` by running ``example_input`` (B, ...) once.

    The pass runs in eval mode under ``no_grad`` (no running statistic changes).
    """
    modules = dict(model.named_modules())
    events: list[tuple[str, list[int], object]] = []   # (name, input ids, output) in call order
    keep: list[object] = []                            # keep tensors alive so ids stay unique
    def make_hook(name):
        def hook(mod, inp, out):
            keep.append((inp, out))
            events.append((name, [id(t) for t in inp if torch.is_tensor(t)], out))
        return hook

    with Hooks() as hooks:
        for name, m in modules.items():
            if _is_weight(m) or _is_norm(m):
                hooks.forward(m, make_hook(name))
        with torch.no_grad(), eval_mode(model):
            logits = model(example_input)
    if not torch.is_tensor(logits):     # a transformers model's output
        logits = logits.logits if hasattr(logits, "logits") else logits[0]

    first: dict[str, tuple[list[int], object]] = {}
    for name, in_ids, out in events:
        first.setdefault(name, (in_ids, out))
    state_keys = dict(model.named_parameters())
    covered: set[str] = set()
    layers, spaces, attached = [], [], set()
    weights = [n for n in first if _is_weight(modules[n])]
    head = weights[-1] if weights else None  # the last linear layer producing logits has no units
    if head is not None:
        out = first[head][1]
        if not (torch.is_tensor(out) and out.shape[-1] == logits.shape[-1] and _kind(modules[head]) == "linear"):
            head = None

    def own_keys(prefix, m, recurse):
        p = tuple(f"{prefix}.{k}" if prefix else k for k, _ in m.named_parameters(recurse=recurse))
        b = tuple(f"{prefix}.{k}" if prefix else k for k, _ in m.named_buffers(recurse=recurse))
        return tuple(k for k in p if k not in covered), b

    for n in first:
        m = modules[n]
        if n in attached:
            continue
        if _is_weight(m):
            out = first[n][1]
            norm = next((k for k, (ids, _) in first.items()
                         if _is_norm(modules[k]) and k not in attached and ids and ids[0] == id(out)), None)
            mods = (n,) if norm is None else (n, norm)
            params, buffers = own_keys(n, m, recurse=isinstance(m, nn.MultiheadAttention))
            if norm is not None:
                attached.add(norm)
                p2, b2 = own_keys(norm, modules[norm], recurse=False)
                params, buffers = params + p2, buffers + b2
            kind = _kind(m)
            if kind in ("conv", "linear") and n != head and torch.is_tensor(out):
                dim = 1 if kind == "conv" else -1
                size = out.shape[dim]
                spaces.append(UnitSpace(n, n, norm, int(size), dim, sum(s.size for s in spaces)))
        else:  # a norm consuming something other than a weight module's output
            mods = (n,)
            params, buffers = own_keys(n, m, recurse=False)
            kind = "norm"
        tied = [k for k in params if k not in state_keys]     # shared with an earlier module (a tied head)
        if tied:
            params = tuple(k for k in params if k in state_keys)
            if not params and not buffers:
                continue                                        # all of it is another layer's
        covered.update(params)
        layers.append(Layer(n, kind, mods, params, buffers, sum(state_keys[k].numel() for k in params)))

    # parameters of modules that are neither weights nor norms (cls tokens, positional embeddings,
    # modules the trace never reached): one layer per owning module, in named_parameters order
    leftovers: dict[str, list[str]] = {}
    for k in state_keys:
        if k not in covered:
            leftovers.setdefault(k.rpartition(".")[0], []).append(k)
    for owner, keys in leftovers.items():
        layers.append(Layer(owner or "<root>", "param", (owner,), tuple(keys), (),
                            sum(state_keys[k].numel() for k in keys)))
    return Structure(layers, spaces)


def _mask_hook(mask: torch.Tensor, dim: int, name: str, group: int = 1, at: str = "output"):
    def scale(out):
        m = mask.to(out.dtype)
        if m.ndim == 1:
            m = m.unsqueeze(0)
        if m.shape[0] not in (1, out.shape[0]):
            raise ValueError(f"mask for {name!r} has batch {m.shape[0]} but the activation has batch {out.shape[0]}")
        if group > 1:
            m = m.repeat_interleave(group, 1)      # one mask value per slice of ``group`` features
        shape = [m.shape[0]] + [1] * (out.ndim - 1)
        shape[dim] = m.shape[1]
        return out * m.reshape(shape)
    if at == "input":
        return lambda mod, args: (scale(args[0]), *args[1:])
    return lambda mod, inp, out: scale(out)


@contextlib.contextmanager
def hooks_of(model: nn.Module, hooks: dict[str, object], *, require_fired: bool = True, pre: dict | None = None):
    """Temporarily register forward hooks ``{module name: hook(mod, inp, out)}`` (and forward pre-hooks
    ``pre`` = ``{module name: hook(mod, args)}``).

    Hooks are removed on exit (also on error). With ``require_fired``, a hook that never ran by
    the end of a successful block raises :class:`HookNotFiredError`.
    """
    modules = dict(model.named_modules())
    pre = pre or {}
    missing = [n for n in (*hooks, *pre) if n not in modules]
    if missing:
        raise KeyError(f"no module named {missing[0]!r} in {type(model).__name__}")
    fired: set[str] = set()

    def wrap(name, fn):
        def hook(mod, *args):
            fired.add(name)
            return fn(mod, *args)
        return hook

    with Hooks() as h:
        for name, fn in hooks.items():
            h.forward(modules[name], wrap(name, fn))
        for name, fn in pre.items():
            h.forward_pre(modules[name], wrap(name, fn))
        yield
    not_fired = [n for n in (*hooks, *pre) if n not in fired]
    if require_fired and not_fired:
        raise HookNotFiredError(f"hooks on {', '.join(not_fired)} never fired: those modules are not on the forward path")


@contextlib.contextmanager
def unit_masks(model: nn.Module, structure: Structure, masks, *, site: str = "pre_norm"):
    """Multiply unit activations by ``masks`` during forward passes inside the block.

    ``masks``: ``{space name: (B, size) or (size,)}`` or a flat ``(B, n_units)`` / ``(n_units,)``
    tensor over all unit spaces. Masks may require grad: then ``mask.grad`` after a backward pass
    is the activation x gradient summed over the non-unit axes (the first-order effect of scaling).
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid: {', '.join(SITES)}")
    if torch.is_tensor(masks):
        masks = structure.split(masks)
    hooks, pre = {}, {}
    for name, mask in masks.items():
        s = structure.space(name)
        if mask.shape[-1] != s.size:
            raise ValueError(f"mask for {name!r} has {mask.shape[-1]} units, the layer has {s.size}")
        module = s.module_at(site)
        (pre if s.at == "input" else hooks)[module] = _mask_hook(mask, s.dim, module, s.group, s.at)
    with hooks_of(model, hooks, pre=pre):
        yield
