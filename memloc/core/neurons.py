"""The MLP hidden neurons of a causal language model: where they are and how to intervene on them.

A transformer block's MLP is ``down(h)`` with ``h = act(up(x))`` (TinyGPT, GPT-2, GPT-NeoX) or
``h = act(gate(x)) * up(x)`` (Llama). Its hidden **neurons** are the features of ``h`` (B, T, d_mlp):
the output features of the up-projection after the nonlinearity, which is exactly the *input* of
the down-projection in every family. So one site serves all of them: a forward pre-hook on the
down-projection (``blocks.<i>.mlp.down`` of :class:`memloc.core.lm.TinyGPT`, GPT-2's Conv1D
``transformer.h.<i>.mlp.c_proj``, GPT-NeoX's ``mlp.dense_4h_to_h``, Llama's ``mlp.down_proj``), which
reads or replaces ``h``. A neuron's **output weights** are the down-projection's input column for it
(``weight[:, j]`` of an ``nn.Linear``, ``weight[j]`` of a transformers ``Conv1D``).

:func:`mlp_layers` finds the down-projections; :func:`neuron_hooks` applies a function to ``h`` of
each layer inside a ``with`` block (the hooks are removed on leaving it, also on error; a hook that
never fired is an error); :func:`neuron_masks` multiplies ``h`` by per-row masks (B, L, d_mlp).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import MemlocError
from .units import HookNotFiredError, Hooks, is_conv1d as _is_conv1d

__all__ = ["DOWN_PROJECTIONS", "NeuronLayer", "mlp_layers", "neuron_hooks", "neuron_masks", "output_weights"]

#: the name a block's MLP down-projection ends with, per model family
DOWN_PROJECTIONS = ("mlp.down", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.down_proj", "mlp.fc_out")


@dataclass(frozen=True)
class NeuronLayer:
    """One MLP layer's neurons: ``name`` = its down-projection's module name, ``size`` = d_mlp."""

    name: str
    size: int


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if _is_conv1d(module):
        return int(module.weight.shape[0])
    return None


def mlp_layers(model: nn.Module) -> list[NeuronLayer]:
    """The MLP layers of ``model`` in forward order (module order), found by their down-projection's
    name (:data:`DOWN_PROJECTIONS`); a :class:`MemlocError` when there is none."""
    if not isinstance(model, nn.Module):
        raise MemlocError(f"model must be a causal language model (a torch.nn.Module), got {type(model).__name__}",
                          argument="model")
    found = []
    for name, module in model.named_modules():
        size = _in_features(module)
        if size is not None and name.endswith(DOWN_PROJECTIONS):
            found.append(NeuronLayer(name, size))
    if not found:
        raise MemlocError(f"{type(model).__name__} has no MLP down-projection (a linear module whose name ends with "
                          f"{', '.join(DOWN_PROJECTIONS)}): its MLP neurons cannot be found", argument="source")
    return found


def output_weights(model: nn.Module, layer: NeuronLayer) -> tuple[nn.Parameter, int]:
    """(weight, dim): neuron j's output weights are ``weight.select(dim, j)``."""
    module = model.get_submodule(layer.name)
    return module.weight, (0 if _is_conv1d(module) else 1)


@contextlib.contextmanager
def neuron_hooks(model: nn.Module, layers: list[NeuronLayer], fn):
    """Inside the block, every forward pass calls ``fn(l, h)`` with layer index ``l`` and its hidden
    activations ``h`` (B, T, d_mlp); a tensor it returns replaces ``h``, None keeps it."""
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
            hooks.forward_pre(model.get_submodule(layer.name), hook_for(i, layer.size))
        yield
    missing = [layers[i].name for i in range(len(layers)) if i not in fired]
    if missing:
        raise HookNotFiredError(f"hooks on {', '.join(missing)} never fired: those modules are not on the forward path")


def neuron_masks(model: nn.Module, layers: list[NeuronLayer], masks: torch.Tensor):
    """Multiply each layer's neurons by ``masks`` (B, L, d_mlp) (or (L, d_mlp), the same for every
    row) inside the block; ``masks`` may require grad (then ``masks.grad`` after a backward pass is
    activation x gradient summed over positions)."""
    if masks.shape[-2:] != (len(layers), max(l.size for l in layers)):
        raise MemlocError(f"masks has shape {tuple(masks.shape)}; give (B, {len(layers)}, d_mlp) masks")

    def scale(index, h):
        m = masks[..., index, :h.shape[-1]].to(h.dtype)
        return h * (m.unsqueeze(-2) if m.ndim == 2 else m)
    return neuron_hooks(model, layers, scale)
