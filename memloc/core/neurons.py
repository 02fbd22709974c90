"""The MLP hidden neurons of a causal language model: where they are and how to intervene on them.

**MLP neurons.** A transformer block's MLP is ``down(h)`` with ``h = act(up(x))`` (TinyGPT, GPT-2, GPT-NeoX) or
``h = act(gate(x)) * up(x)`` (Llama). Its hidden **neurons** are the features of ``h`` (B, T, d_mlp):
the output features of the up-projection after the nonlinearity, which is exactly the *input* of
the down-projection in every family. So one site serves all of them: a forward pre-hook on the
down-projection (``blocks.<i>.mlp.down`` of :class:`memloc.core.lm.TinyGPT`, GPT-2's Conv1D
``transformer.h.<i>.mlp.c_proj``, GPT-NeoX's ``mlp.dense_4h_to_h``, Llama's ``mlp.down_proj``), which
reads or replaces ``h``. A neuron's **output weights** are the down-projection's input column for it
(``weight[:, j]`` of an ``nn.Linear``, ``weight[j]`` of a transformers ``Conv1D``).

**Attention heads.** An attention block's output projection (``attn.proj`` of TinyGPT, GPT-2's
``attn.c_proj``, GPT-NeoX's ``attention.dense``, Llama's ``self_attn.o_proj``) reads the heads' outputs
concatenated, head after head (B, T, n_head x head_dim); head k is the slice ``k * head_dim ..
(k + 1) * head_dim - 1`` of that input, so scaling the slice by 0 zeroes the head's contribution to the
residual stream (the projection's bias stays). A head is a unit spanning ``group = head_dim`` features.

:func:`mlp_layers` finds the down-projections, :func:`attention_heads` the output projections,
:func:`unit_layers` either or both (:data:`UNIT_KINDS`); :func:`neuron_hooks` applies a function to
``h`` of each layer inside a ``with`` block (the hooks are removed on leaving it, also on error; a hook
that never fired is an error); :func:`neuron_masks` multiplies ``h`` by per-row masks (B, L, units),
one value per unit; :func:`unit_structure` is a :class:`memloc.core.units.Structure` whose unit spaces
are these (what :func:`memloc.flip` zeroes with ``units="mlp" | "heads" | "both"``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import MemlocError
from .units import HookNotFiredError, Hooks, Structure, UnitSpace, is_conv1d as _is_conv1d, trace

__all__ = ["DOWN_PROJECTIONS", "OUT_PROJECTIONS", "UNIT_KINDS", "NeuronLayer", "mlp_layers", "attention_heads",
           "unit_layers", "check_units", "unit_structure", "neuron_hooks", "neuron_masks", "output_weights"]

#: the name a block's MLP down-projection ends with, per model family
DOWN_PROJECTIONS = ("mlp.down", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.down_proj", "mlp.fc_out")
#: the name an attention block's output projection ends with, per model family
OUT_PROJECTIONS = ("attn.proj", "attn.c_proj", "attention.dense", "self_attn.o_proj", "attn.out_proj")
#: the kinds of units: every conv / linear layer's output features (traced; any model), a language model's
#: MLP neurons, its attention heads, or both of these
UNIT_KINDS = ("outputs", "mlp", "heads", "both")


@dataclass(frozen=True)
class NeuronLayer:
    """One layer's units at the input of module ``name``: an MLP's neurons (its down-projection,
    ``size`` = d_mlp, ``group`` 1) or an attention block's heads (its output projection, ``size`` =
    n_head, ``group`` = head_dim features per head)."""

    name: str
    size: int
    group: int = 1

    @property
    def width(self) -> int:
        """The features of the module's input: ``size * group``."""
        return self.size * self.group


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if _is_conv1d(module):
        return int(module.weight.shape[0])
    return None


def _projections(model: nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, int]]:
    """(name, input features) of the linear modules of ``model`` whose name ends with one of ``suffixes``."""
    if not isinstance(model, nn.Module):
        raise MemlocError(f"model must be a causal language model (a torch.nn.Module), got {type(model).__name__}",
                          argument="model")
    return [(name, _in_features(module)) for name, module in model.named_modules()
            if _in_features(module) is not None and name.endswith(suffixes)]


def mlp_layers(model: nn.Module) -> list[NeuronLayer]:
    """The MLP layers of ``model`` in forward order (module order), found by their down-projection's
    name (:data:`DOWN_PROJECTIONS`); a :class:`MemlocError` when there is none."""
    found = [NeuronLayer(name, size) for name, size in _projections(model, DOWN_PROJECTIONS)]
    if not found:
        raise MemlocError(f"{type(model).__name__} has no MLP down-projection (a linear module whose name ends with "
                          f"{', '.join(DOWN_PROJECTIONS)}): its MLP neurons cannot be found", argument="source")
    return found


def _n_head(model: nn.Module, name: str) -> int | None:
    """The head count of the attention block owning output projection ``name`` (its attribute, else the
    model config's)."""
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    for owner in (parent, getattr(model, "config", None)):
        for key in ("n_head", "num_heads", "num_attention_heads"):
            value = getattr(owner, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def attention_heads(model: nn.Module) -> list[NeuronLayer]:
    """The attention heads of ``model`` per block in forward order (module order), found by their output
    projection's name (:data:`OUT_PROJECTIONS`) and the head count of its block (its ``n_head`` /
    ``num_heads`` / ``num_attention_heads``, else ``model.config.num_attention_heads``); a
    :class:`MemlocError` when there is none or a count does not divide the projection's input."""
    found = []
    for name, width in _projections(model, OUT_PROJECTIONS):
        n_head = _n_head(model, name)
        if n_head is None or width % n_head:
            raise MemlocError(f"cannot tell the heads of {name} ({width} input features; head count "
                              f"{n_head if n_head else 'not found'}): give the attention block an n_head attribute",
                              argument="units")
        found.append(NeuronLayer(name, n_head, width // n_head))
    if not found:
        raise MemlocError(f"{type(model).__name__} has no attention output projection (a linear module whose name ends "
                          f"with {', '.join(OUT_PROJECTIONS)}): its attention heads cannot be found", argument="units")
    return found


def check_units(units, valid=UNIT_KINDS) -> str:
    """``units`` if it is one of ``valid``, else a one-line :class:`MemlocError`."""
    if not isinstance(units, str) or units not in valid:
        raise MemlocError(f"unknown units {units!r}; valid here: {', '.join(valid)}", argument="units")
    return units


def unit_layers(model: nn.Module, units: str = "mlp") -> list[NeuronLayer]:
    """The unit layers of kind ``units``: ``mlp`` (:func:`mlp_layers`), ``heads`` (:func:`attention_heads`)
    or ``both`` (every block's heads, then its MLP neurons: module order)."""
    check_units(units, ("mlp", "heads", "both"))
    if units != "both":
        return mlp_layers(model) if units == "mlp" else attention_heads(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(attention_heads(model) + mlp_layers(model), key=lambda layer: order[layer.name])


def unit_structure(model: nn.Module, example: torch.Tensor, units: str = "outputs") -> Structure:
    """The layers and unit spaces of ``model`` (:func:`memloc.core.units.trace` on ``example``): with
    ``units="outputs"`` the traced ones (every conv / linear layer's output features); with ``mlp``,
    ``heads`` or ``both`` the traced layers and, as unit spaces, :func:`unit_layers` (each named after the
    module whose input it is: the down-projection, the output projection)."""
    check_units(units)
    structure = trace(model, example)
    if units == "outputs":
        return structure
    spaces, offset = [], 0
    for layer in unit_layers(model, units):
        spaces.append(UnitSpace(layer.name, layer.name, None, layer.size, -1, offset, layer.group, "input"))
        offset += layer.size
    return Structure(structure.layers, spaces)


def output_weights(model: nn.Module, layer: NeuronLayer) -> tuple[nn.Parameter, int]:
    """(weight, dim): neuron j's output weights are ``weight.select(dim, j)``."""
    module = model.get_submodule(layer.name)
    return module.weight, (0 if _is_conv1d(module) else 1)


@contextlib.contextmanager
def neuron_hooks(model: nn.Module, layers: list[NeuronLayer], fn):
    """Inside the block, every forward pass calls ``fn(l, h)`` with layer index ``l`` and its hidden
    activations ``h`` (B, T, size x group); a tensor it returns replaces ``h``, None keeps it."""
    fired: set[int] = set()

    def hook_for(index: int, size: int):
        def hook(module, args):
            h = args[0]
            if h.shape[-1] != size:
                raise MemlocError(f"the input of {layers[index].name} has {h.shape[-1]} features, not {size}")
            fired.add(index)
            out = fn(index, h)
            return None if out is None else (out, *args[1:])
        return hook

    with Hooks() as hooks:
        for i, layer in enumerate(layers):
            hooks.forward_pre(model.get_submodule(layer.name), hook_for(i, layer.width))
        yield
    missing = [layers[i].name for i in range(len(layers)) if i not in fired]
    if missing:
        raise HookNotFiredError(f"hooks on {', '.join(missing)} never fired: those modules are not on the forward path")


def neuron_masks(model: nn.Module, layers: list[NeuronLayer], masks: torch.Tensor):
    """Multiply each layer's units by ``masks`` (B, L, units) (or (L, units), the same for every row;
    a head's value scales its head_dim features) inside the block; ``masks`` may require grad (then
    ``masks.grad`` after a backward pass is activation x gradient summed over positions and features)."""
    if masks.shape[-2:] != (len(layers), max(l.size for l in layers)):
        raise MemlocError(f"masks has shape {tuple(masks.shape)}; give (B, {len(layers)}, units) masks")

    def scale(index, h):
        layer = layers[index]
        m = masks[..., index, :layer.size].to(h.dtype)
        if layer.group > 1:
            m = m.repeat_interleave(layer.group, -1)
        return h * (m.unsqueeze(-2) if m.ndim == 2 else m)
    return neuron_hooks(model, layers, scale)
