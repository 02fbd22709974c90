"""Optimiser and learning-rate schedule builders shared by training and layer retraining."""
from __future__ import annotations

import inspect
import math

import torch

from .errors import MemlocError

__all__ = ["OPTIMIZERS", "SCHEDULES", "lr_factor", "make_optimizer", "make_schedule", "epoch_seed"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("onecycle", "cosine", "warmup_cosine", "constant")


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """Learning-rate multiplier at optimiser step ``step`` of ``total``.

    ``onecycle``: linear from 0 to 1 over the first ``warmup`` fraction, then linear down to 0;
    ``cosine``: half a cosine from 1 to 0; ``warmup_cosine``: linear from 0 to 1 over the first
    ``warmup`` fraction, then half a cosine down to 0 (the usual language-model schedule); ``constant``: 1.
    A schedule of a single step (``total <= 1``) takes it at the peak, 1: step 0 of a warm-up is at 0,
    which would leave one-step training (one batch, one epoch) without any update.
    """
    t = min(step / max(total, 1), 1.0)
    if schedule in SCHEDULES and total <= 1:
        return 1.0
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "warmup_cosine":
        if t < warmup:
            return t / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup))) if warmup < 1 else 1.0
    if schedule == "onecycle":
        if t < warmup:
            return t / warmup
        return max(0.0, (1 - t) / (1 - warmup)) if warmup < 1 else 1.0
    raise MemlocError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def _eager(base: type) -> type:
    """``base`` (a torch optimiser class) with the same arithmetic, minus its ``torch._dynamo`` import.

    torch.optim's ``step``, ``add_param_group`` (called by ``__init__``), ``zero_grad`` and
    ``(load_)state_dict`` import ``torch._dynamo`` on their first call (2-5 s on 2 cores) only to
    switch it off under ``torch.compile``; memloc never compiles them, so its optimisers call the
    undecorated methods (``step`` under ``torch.no_grad()``, as torch's wrapper does for
    ``differentiable=False``). Updates are bit-identical (tests/test_train.py); hooks, schedulers
    and ``isinstance(opt, base)`` work as before."""
    raw_step = inspect.unwrap(base.step)

    def step(self, closure=None):
        with torch.no_grad():
            return raw_step(self, closure)

    methods = {name: inspect.unwrap(getattr(base, name))
               for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict")}
    return type(base.__name__, (base,), {"step": step, **methods, "__module__": __name__,
                                         "__qualname__": f"_EAGER.{base.__name__}", "__doc__": base.__doc__})


#: the optimiser classes memloc builds (module level, so optimisers pickle)
class _EAGER:
    SGD = _eager(torch.optim.SGD)
    AdamW = _eager(torch.optim.AdamW)


def make_optimizer(params, name: str = "sgd", *, lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """SGD (Nesterov when ``momentum`` > 0) or AdamW over ``params``."""
    if name == "sgd":
        return _EAGER.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    if name == "adam":
        return _EAGER.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise MemlocError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def make_schedule(opt: torch.optim.Optimizer, total_steps: int, schedule: str = "onecycle",
                  warmup: float = 0.5) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`LambdaLR` following :func:`lr_factor` over ``total_steps`` steps."""
    lr_factor(0, 1, schedule, warmup)   # validates the name
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, schedule, warmup))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch order and dropout noise (so a resumed run replays it)."""
    return (seed * 1_000_003 + epoch) % (2 ** 63)
