"""Numeric precision of forward passes (autocast) and the channels_last layout of conv nets.

``precision``: ``fp32`` (default: plain float32, nothing changes), ``bf16`` or ``fp16``: matrix
products and convolutions run in that 16-bit type under :func:`torch.autocast` (parameters,
optimiser state and reductions such as the loss stay float32). Training in ``fp16`` scales the loss
(:func:`grad_scaler`) so that small gradients do not underflow; ``bf16`` needs no scaling.

channels_last: on CUDA with a 16-bit precision, models holding an ``nn.Conv2d`` are put in the
channels_last memory format (tensor cores read NHWC; :func:`apply_channels_last`); elsewhere
(fp32, the CPU, models without 2-d convolutions) nothing changes.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .errors import MemlocError

__all__ = ["PRECISIONS", "check_precision", "autocast", "grad_scaler", "use_channels_last", "to_channels_last",
           "apply_channels_last", "laid_out"]

#: precision name -> autocast dtype (None: no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision, device=None) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` (and, with ``device``, runs there), else a
    :class:`MemlocError` starting with "precision". fp16 on the CPU works but warns (it is slow)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise MemlocError(f"precision {precision!r} is unknown; valid: {', '.join(PRECISIONS)}",
                          argument="precision")
    if device is None or precision == "fp32":
        return precision
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):
        raise MemlocError(f"precision {precision} needs autocast on {kind}, which this torch does not offer; "
                          "use fp32", argument="precision")
    if kind == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise MemlocError("precision bf16 is not supported by this GPU; use fp16 or fp32", argument="precision")
    if kind == "cpu" and precision == "fp16":
        warnings.warn("precision fp16 on the CPU can be much slower than fp32; bf16 is the CPU's 16-bit type")
    return precision


def autocast(precision: str, device):
    """A context in which forward passes run in ``precision`` on ``device`` (a no-op for fp32).

    Without autocast's cache of 16-bit weight copies: analyses change weights in place between the
    passes of one block (rewinding a layer, zeroing weights), and a cached copy would be stale."""
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=False)


def grad_scaler(precision: str, device) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (disabled, ``scale`` / ``step`` / ``update`` are the plain
    ``loss`` / ``optimizer.step()`` / nothing, so fp32 and bf16 training are unchanged)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=check_precision(precision) == "fp16")


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def use_channels_last(model: nn.Module, precision: str, device) -> bool:
    """Does channels_last help here? On CUDA, with a 16-bit precision, for models with an ``nn.Conv2d``."""
    return torch.device(device).type == "cuda" and check_precision(precision) != "fp32" and _has_conv2d(model)


def to_channels_last(obj):
    """A model with an ``nn.Conv2d`` (converted in place) or a 4-D tensor in channels_last memory format;
    anything else is returned unchanged. Values are unchanged, only the layout of 4-D tensors."""
    if isinstance(obj, nn.Module):
        return obj.to(memory_format=torch.channels_last) if _has_conv2d(obj) else obj
    if torch.is_tensor(obj) and obj.ndim == 4:
        return obj.contiguous(memory_format=torch.channels_last)
    return obj


def apply_channels_last(model: nn.Module, precision: str, device) -> bool:
    """Put ``model`` (in place) in channels_last where :func:`use_channels_last` says it helps; returns
    whether it did (then pass inputs through :func:`to_channels_last` too)."""
    if not use_channels_last(model, precision, device):
        return False
    to_channels_last(model)
    return True


def laid_out(model: nn.Module, precision: str, device) -> nn.Module:
    """``model`` after :func:`apply_channels_last`: what an analysis's passes run, in one expression
    (``evaluate(laid_out(run.model(e, device=d), precision, d), ...)``). Every analysis that may run a conv
    net in ``precision`` lays it out so (``tests/test_vocabulary.py``); a language model holds no 2-d
    convolution, so it is returned as it is."""
    apply_channels_last(model, precision, device)
    return model
