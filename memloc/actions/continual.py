"""The continual-learning pieces of unlearning: EWC / MAS quadratic penalties, LwF distillation,
and the fine-tuning loop they plug into (:func:`memloc.unlearn`, :mod:`memloc.actions.forgetting`).

Each takes a ``task`` (:mod:`memloc.core.tasks`; default a classifier's): a language model's fine-tunes
on the suffix loss, distils the logits of every position up to the suffix's end and weighs its
penalties by the importance of the suffixes (:func:`memloc.analyses.importance.param_importance`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..analyses.importance import param_importance
from ..core.errors import MemlocError
from ..core.optim import OPTIMIZERS, epoch_seed, make_optimizer
from ..core.precision import autocast, grad_scaler
from ..core.tasks import ClassifierTask

__all__ = ["TEMPERATURE", "LM_ASCENT", "LM_EPOCHS", "quadratic_penalty", "distillation_loss", "protection_weights",
           "penalty_term", "distillation_term", "finetune", "optimiser_settings"]

#: LwF's distillation temperature
TEMPERATURE = 2.0
#: a language model's run at its own optimiser (artifacts/lm_mitigation.md, the 150-epoch TinyGPT TinyMem run,
#: AdamW at lr 3e-3): gradient ascent's learning rate as a multiple of the run's (the largest of 1, 1/3, 1/10 and
#: 1/30 that lost no held-out accuracy: 1/10 left 69% of the targets, 1/3 35% at -2.3 points, 1 none at -23) and
#: the fine-tuning epochs (the fewest of 5, 10 and 20 that left at most 1% of the targets: 5 and 10 left 10%)
LM_ASCENT = 0.1
LM_EPOCHS = 20


def optimiser_settings(run, optimizer: str | None, lr: float | None, ascent_lr: float | None, epochs: int | None,
                       *, sgd: dict) -> dict:
    """The optimiser, learning rates and fine-tuning epochs of unlearning (:func:`memloc.unlearn`), and where
    they come from (``defaults``).

    Unset (``None``) values default to: on a language model's run, when ``optimizer`` is unset or is the
    run's own training optimiser, the run's optimiser and learning rate (fine-tuning, EWC / MAS / LwF),
    :data:`LM_ASCENT` x that rate (ascent) and :data:`LM_EPOCHS`; otherwise SGD (momentum 0.9) at ``sgd``'s
    ``lr``, ``ascent_lr`` and ``epochs`` (the image defaults; with ``optimizer="adam"`` on a run not trained
    with it, the same values)."""
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise MemlocError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}", argument="optimizer")
    trained = run.config.get("optimizer")
    own = bool(run.is_lm) and trained in OPTIMIZERS and optimizer in (None, trained)
    if own:
        base = float(run.config["lr"])
        defaults = {"optimizer": trained, "lr": base, "ascent_lr": float(f"{LM_ASCENT * base:.6g}"),
                    "epochs": LM_EPOCHS}
        why = (f"the run's own training optimizer ({trained}) and lr ({base:g}); ascent at {LM_ASCENT:g}x that lr; "
               f"{LM_EPOCHS} epochs (a language model's defaults)")
    else:
        defaults = {"optimizer": "sgd", **{k: sgd[k] for k in ("lr", "ascent_lr", "epochs")}}
        why = "memloc.unlearn.HYPER (the image defaults)"
    given = {k: v for k, v in (("optimizer", optimizer), ("lr", lr), ("ascent_lr", ascent_lr), ("epochs", epochs))
             if v is not None}
    if given:
        why += "; given: " + ", ".join(f"{k}={v}" for k, v in given.items())
    return {**defaults, **given, "defaults": why}


def quadratic_penalty(model: nn.Module, anchor: dict[str, torch.Tensor], weight: dict[str, torch.Tensor],
                      lam: float) -> torch.Tensor:
    """(lam / 2) sum_i weight_i (theta_i - anchor_i)^2 over the parameters named in ``weight`` (EWC, MAS)."""
    params = dict(model.named_parameters())
    total = sum((w * (params[k] - anchor[k]).pow(2)).sum() for k, w in weight.items())
    return 0.5 * lam * total


def distillation_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """LwF: T^2 KL(softmax(old / T) || softmax(new / T)) over the last dimension, mean over the other
    rows (the batch; a language model's (B, T, V) logits: its B x T positions)."""
    t = temperature
    new_logits, old_logits = new_logits.reshape(-1, new_logits.shape[-1]), old_logits.reshape(-1, old_logits.shape[-1])
    old = F.softmax(old_logits / t, dim=1)
    return F.kl_div(F.log_softmax(new_logits / t, dim=1), old, reduction="batchmean") * t * t


def protection_weights(model: nn.Module, examples, kind: str, *, precision: str = "fp32",
                       task=None) -> dict[str, torch.Tensor]:
    """EWC (``kind="ewc"``: diagonal Fisher) or MAS importance of ``examples`` at ``model``, divided by its
    maximum (lambda on one scale for both; lr x lambda < 2 keeps the penalty's steps stable)."""
    weight = param_importance(model, examples.x, examples.y, method="fisher" if kind == "ewc" else "mas",
                              precision=precision, task=task)
    scale = max(float(w.max()) for w in weight.values()) or 1.0
    return {k: w / scale for k, w in weight.items()}


def penalty_term(anchor: dict[str, torch.Tensor], weight: dict[str, torch.Tensor], lam: float):
    """The ``extra`` of :func:`finetune` adding the EWC / MAS :func:`quadratic_penalty`."""
    return lambda model, x, logits: quadratic_penalty(model, anchor, weight, lam)


def distillation_term(teacher: nn.Module, lam: float, temperature: float = TEMPERATURE, task=None):
    """The ``extra`` of :func:`finetune` adding LwF's :func:`distillation_loss` from ``teacher``'s outputs."""
    task = ClassifierTask if task is None else task

    def term(model, x, logits):
        with torch.no_grad():
            target = task.outputs(teacher, x)
        return lam * distillation_loss(logits, target, temperature)
    return term


def finetune(model: nn.Module, examples, *, epochs: int, lr: float, batch_size: int = 128, momentum: float = 0.9,
             seed: int = 0, ascent: bool = False, extra=None, optimizer: str | torch.optim.Optimizer | None = None,
             first_epoch: int = 1,
             precision: str = "fp32", scaler=None, task=None) -> nn.Module:
    """SGD on ``examples`` (an ExampleSet) in train mode: descent on CE (or ascent), plus
    ``extra(model, x, logits)``. ``optimizer``: a name of :data:`memloc.core.optim.OPTIMIZERS` (``"sgd"``,
    the default, with ``momentum``; ``"adam"``: AdamW, no weight decay, a language model's optimiser) or an
    optimiser (reused across calls, momentum kept); with ``first_epoch`` (batch orders seeded by
    ``(seed, epoch)``) it lets a caller train epoch by epoch.
    ``precision``: the forward passes and the loss under autocast, the fp16 loss scaled by ``scaler``
    (default: a new :func:`memloc.core.precision.grad_scaler`; pass one with ``optimizer`` to keep its
    scale across calls); fp32 computes exactly as without it. ``task``: the loss (:mod:`memloc.core.tasks`;
    default the cross-entropy of a classifier; a language model's: the suffix loss)."""
    task = ClassifierTask if task is None else task
    opt = (optimizer if isinstance(optimizer, torch.optim.Optimizer) else
           make_optimizer(model.parameters(), optimizer or "sgd", lr=lr, momentum=momentum, weight_decay=0.0))
    device = next(model.parameters()).device
    scaler = scaler or grad_scaler(precision, device)
    for epoch in range(first_epoch, first_epoch + epochs):
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        model.train()
        for x, y, _ in examples.batches(batch_size, shuffle=True, generator=gen):
            if len(y) < 2:
                continue
            with autocast(precision, device):
                logits = task.outputs(model, x)   # one forward: BN statistics and dropout masks shared by both terms
                loss = task.output_loss(logits, x, y)
                loss = -loss if ascent else loss
                if extra is not None:
                    loss = loss + extra(model, x, logits)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return model.eval()
