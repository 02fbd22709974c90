"""A set of examples held as tensors on one device, batched as ``(x, y, idx)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

__all__ = ["ExampleSet"]


@dataclass
class ExampleSet:
    """Examples as tensors (on one device): ``x`` (N, ...), labels ``y`` (N,), ids ``idx`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def nbytes(self) -> int:
        return self.x.nelement() * self.x.element_size()

    def to(self, device) -> "ExampleSet":
        return ExampleSet(self.x.to(device), self.y.to(device), self.idx.to(device))

    def subset(self, rows) -> "ExampleSet":
        """Rows selected by a boolean mask or integer positions (ids are kept)."""
        rows = torch.as_tensor(np.asarray(rows), device=self.y.device)
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        return ExampleSet(self.x[rows], self.y[rows], self.idx[rows])

    def with_labels(self, y) -> "ExampleSet":
        return ExampleSet(self.x, torch.as_tensor(np.asarray(y), device=self.y.device).long(), self.idx)

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield ``(x, y, idx)`` batches; ``shuffle`` draws the order from ``generator`` (CPU)."""
        n = len(self)
        order = torch.randperm(n, generator=generator).to(self.y.device) if shuffle else None
        for s in range(0, n, batch_size):
            if order is None:
                yield self.x[s:s + batch_size], self.y[s:s + batch_size], self.idx[s:s + batch_size]
            else:
                rows = order[s:s + batch_size]
                yield self.x[rows], self.y[rows], self.idx[rows]
