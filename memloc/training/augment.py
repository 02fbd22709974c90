"""On-device training augmentation: random crop with zero padding and random horizontal flip.

``augment_batch(x, "crop+flip", 4, generator)`` augments a batch of images ``x`` (B, C, H, W)
where it lies (CPU or GPU), vectorised over the batch: one gather, no per-image loop.
The random draws come from ``generator`` alone, in a fixed order (crop rows, crop columns, then
flips, each one value per image), so a batch is augmented identically on every device and
:func:`augment_generator` makes an epoch's augmentation a function of ``(seed, epoch)`` (a
resumed run replays it exactly). The training loop of :func:`memloc.train` applies it to training
batches only; evaluation passes always see the original images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import MemlocError

__all__ = ["AUGMENTATIONS", "parse_augment", "augment_batch", "augment_generator"]

#: valid values of the ``augment`` option (None = no augmentation)
AUGMENTATIONS = ("crop", "flip", "crop+flip")
_STREAM = 0x61756701   # separates the augmentation's random stream from every other seeded stream


def parse_augment(augment, argument: str = "augment") -> tuple[str, ...]:
    """``"crop+flip"`` -> ``("crop", "flip")``; None or ``"none"`` -> ``()``."""
    if augment is None or augment == "none":
        return ()
    if augment not in AUGMENTATIONS:
        raise MemlocError(f"{argument} must be none, {', '.join(AUGMENTATIONS[:-1])} or {AUGMENTATIONS[-1]}, "
                          f"got {augment!r}", argument=argument)
    return tuple(augment.split("+"))


def augment_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of epoch ``epoch``'s augmentation, seeded from ``(seed, epoch)`` only
    (independent of the batch order's and the dropout's streams)."""
    state = np.random.SeedSequence([int(seed), _STREAM, int(epoch)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def augment_batch(x: torch.Tensor, kinds, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augmented copy of the images ``x`` (B, C, H, W), same shape, dtype and device.

    ``kinds``: ``"crop"``, ``"flip"``, ``"crop+flip"`` (or a tuple of ``"crop"`` / ``"flip"``).
    crop: pad ``pad`` zeros on each side, then cut an H x W window at offsets (dy, dx) drawn
    uniformly from 0..2*pad per image; flip: mirror the columns of each image with probability
    1/2 (after the crop, as torchvision's RandomCrop then RandomHorizontalFlip).
    """
    kinds = parse_augment(kinds, "kinds") if isinstance(kinds, str) or kinds is None else tuple(kinds)
    if set(kinds) - {"crop", "flip"}:
        raise MemlocError(f"kinds must name crop and / or flip, got {kinds!r}", argument="kinds")
    if not torch.is_tensor(x) or x.ndim != 4:
        raise MemlocError(f"augmentation needs a batch of images (B, C, H, W), got inputs of shape "
                          f"{tuple(getattr(x, 'shape', ()))}", argument="x")
    if not kinds:
        return x
    b, c, h, w = x.shape
    dev = generator.device if generator is not None else torch.device("cpu")
    p = int(pad) if "crop" in kinds else 0
    if p < 0:
        raise MemlocError(f"pad must be at least 0, got {pad}", argument="pad")
    if "crop" in kinds:
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
    else:
        dy = dx = torch.zeros(b, dtype=torch.long, device=dev)
    flip = (torch.rand(b, generator=generator, device=dev) < 0.5 if "flip" in kinds
            else torch.zeros(b, dtype=torch.bool, device=dev))
    i, j = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = dy[:, None] + i                                              # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - j, j)       # (B, W), the flip folded in
    padded = F.pad(x, (p, p, p, p)) if p else x
    # one gather over the flattened padded image: output pixel (r, s) <- padded pixel (rows[r], cols[s])
    flat = (rows[:, :, None] * padded.shape[3] + cols[:, None, :]).reshape(b, 1, h * w).to(x.device)
    return padded.reshape(b, c, -1).gather(2, flat.expand(b, c, h * w)).reshape(b, c, h, w)
