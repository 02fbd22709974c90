"""Example-tied dropout modules and the counter-based hash behind their masks.

See :mod:`memloc.dropout` for the method. Masks are a counter-based hash (splitmix64 in int64
torch ops) of (seed, layer, example id, unit index), computed on the activation's device at every
forward: no per-dataset buffer, identical on every device by construction.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MemlocError

__all__ = ["ExampleTiedDropout", "StandardDropout", "FixedSparseDropout", "KINDS", "MODES", "example_masks",
           "layer_seed"]

MODES = ("auto", "train", "test", "drop")

# ---------------------------------------------------------------------- counter-based hash
_U64 = 1 << 64


def _s64(u: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``u``."""
    u %= _U64
    return u - _U64 if u >= 1 << 63 else u


_GOLDEN, _M1, _M2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic = arithmetic mod 2**64)."""
    x = x + _GOLDEN
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def _splitmix_int(u: int) -> int:
    """Pure-Python splitmix64 (unsigned ints), used for seeds."""
    u = (u + 0x9E3779B97F4A7C15) % _U64
    u = ((u ^ (u >> 30)) * 0xBF58476D1CE4E5B9) % _U64
    u = ((u ^ (u >> 27)) * 0x94D049BB133111EB) % _U64
    return u ^ (u >> 31)


def example_masks(ids: torch.Tensor, units: torch.Tensor, *, p_mem: float, seed: int) -> torch.Tensor:
    """Keep masks of example ``ids`` (B,) for unit indices ``units`` (M,): (B, M) bool.

    Bit ``[b, m]`` is ``splitmix(splitmix(ids[b] ^ splitmix(seed)) + units[m]) >> 11 < p_mem * 2**53``
    (logical shift on the 64 bits): true with probability ``p_mem``, a pure function of (seed,
    id, unit) computed on ``ids``' device.
    """
    key = _s64(_splitmix_int(int(seed) % _U64))
    h = _splitmix(_splitmix(ids.long() ^ key)[:, None] + units.long()[None, :].to(ids.device))
    return _lsr(h, 11) < round(float(p_mem) * 2 ** 53)


# ---------------------------------------------------------------------- modules
class _UnitDropout(nn.Module):
    """Common machinery: generalisation units, mode dispatch, unit axis, hooking."""

    kind = "?"

    def __init__(self, p_gen: float, *, dim: int | None = None):
        super().__init__()
        if not 0 < float(p_gen) <= 1:
            raise MemlocError(f"p_gen must be in (0, 1], got {p_gen}")
        self.p_gen = float(p_gen)
        self.dim = dim
        self.mode = "auto"
        self.where = None          # name of the module it follows (set by insert_example_tied_dropout)
        self.units_seen = None     # number of units of the last activation (for reports)
        self._ids = None

    def n_gen(self, n_units: int) -> int:
        """Number of generalisation units among ``n_units``: ``floor(p_gen * n_units)``."""
        return int(math.floor(self.p_gen * n_units + 1e-9))

    def effective_mode(self) -> str:
        return ("train" if self.training else "test") if self.mode == "auto" else self.mode

    def _unit_dim(self, x: torch.Tensor) -> int:
        if self.dim is not None:
            return self.dim % x.ndim
        if x.ndim < 2:
            raise ValueError(f"{self._label()}: expected a (B, C, ...) or (B, ..., C) activation, got shape {tuple(x.shape)}")
        return 1 if x.ndim >= 4 else x.ndim - 1

    def _scale(self, x: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
        """``x * scale`` with ``scale`` (B or 1, C) broadcast along the unit axis ``dim``."""
        shape = [1] * x.ndim
        shape[0], shape[dim] = scale.shape
        return x * scale.to(x.dtype).reshape(shape)

    def _gen_scale(self, n_units: int, gen: float, mem: float, device) -> torch.Tensor:
        s = torch.full((1, n_units), float(mem), device=device)
        s[:, :self.n_gen(n_units)] = gen
        return s

    def _label(self) -> str:
        return f"{type(self).__name__}" + (f" after {self.where!r}" if self.where else "")

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, ...) for ndim >= 4, else (B, [T,] C); ``ids`` (B,) example ids (train mode)."""
        if not torch.is_tensor(x):
            raise TypeError(f"{self._label()}: the output to drop units of is a {type(x).__name__}, not a tensor")
        dim = self._unit_dim(x)
        self.units_seen = int(x.shape[dim])
        mode = self.effective_mode()
        if mode == "train":
            return self._train(x, dim, self._ids if ids is None else ids)
        if mode == "test":
            return self._test(x, dim)
        return self._drop(x, dim)

    def _hook(self, module, inputs, output):
        self.train(module.training)
        return self(output)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config().items())

    def _config(self) -> dict:
        return {"p_gen": self.p_gen, "mode": self.mode, **({"after": self.where} if self.where else {})}


class ExampleTiedDropout(_UnitDropout):
    """Example-tied dropout over the units (channels / features) of an activation.

    Parameters
    ----------
    p_gen : float in (0, 1]
        Fraction of units always kept (the first ``floor(p_gen * C)``: generalisation units).
    p_mem : float in [0, 1]
        Probability that a memorisation unit is kept for a given example.
    seed : int
        Seed of the masks; the mask of (example id, unit) is a pure function of (seed, id, unit).
    dim : int, optional
        Unit axis; default 1 for activations with >= 4 dims (NCHW), else the last.

    Train mode needs the example ids of the batch: ``forward(x, ids)``, or for a model with
    inserted layers ``with example_ids(model, idx): model(x)``.
    """

    kind = "example_tied"

    def __init__(self, p_gen: float, p_mem: float, *, seed: int = 0, dim: int | None = None):
        super().__init__(p_gen, dim=dim)
        if not 0 <= float(p_mem) <= 1:
            raise MemlocError(f"p_mem must be in [0, 1], got {p_mem}")
        self.p_mem = float(p_mem)
        self.seed = int(seed)

    def masks(self, ids: torch.Tensor, n_units: int) -> torch.Tensor:
        """(B, n_units) float keep masks (1 = kept) of example ``ids`` (B,), on ``ids``' device."""
        n_gen = self.n_gen(n_units)
        mem = example_masks(ids, torch.arange(n_gen, n_units, device=ids.device), p_mem=self.p_mem, seed=self.seed)
        return torch.cat([torch.ones(len(ids), n_gen, dtype=torch.bool, device=ids.device), mem], 1).float()

    def _train(self, x, dim, ids):
        if ids is None:
            raise MemlocError(f"{self._label()} is in train mode but no example ids are bound: wrap the "
                            "forward in `with memloc.core.dropout.example_ids(model, idx):` (or pass ids=; a "
                            "SequenceRecorder's sinks: `with rec.sinks(idx):`), "
                            "or switch to eval / set_mode(model, 'test' or 'drop')")
        ids = torch.as_tensor(ids, device=x.device)
        if ids.ndim != 1 or ids.shape[0] != x.shape[0] or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{self._label()}: example ids must be an integer vector of the batch size "
                             f"{x.shape[0]}, got {tuple(ids.shape)} {ids.dtype}")
        return self._scale(x, self.masks(ids, x.shape[dim]), dim)

    def _test(self, x, dim):
        return self._scale(x, self._gen_scale(x.shape[dim], 1.0, self.p_mem, x.device), dim)

    def _drop(self, x, dim):
        return self._scale(x, self._gen_scale(x.shape[dim], (self.p_gen + self.p_mem) / self.p_gen, 0.0, x.device), dim)

    def _config(self) -> dict:
        return {"p_gen": self.p_gen, "p_mem": self.p_mem, "seed": self.seed, **super()._config()}


class StandardDropout(_UnitDropout):
    """Baseline: ordinary (element-wise, inverted) dropout with ``p = 1 - p_gen``.

    ``test``: identity. ``drop``: the same units as example-tied dropout's memorisation units
    (all but the first ``floor(p_gen * C)``) are zeroed and the rest scaled by ``1 / p_gen``.
    """

    kind = "standard"

    def _train(self, x, dim, ids):
        return F.dropout(x, p=1 - self.p_gen, training=True)

    def _test(self, x, dim):
        return x

    def _drop(self, x, dim):
        return self._scale(x, self._gen_scale(x.shape[dim], 1 / self.p_gen, 0.0, x.device), dim)


class FixedSparseDropout(_UnitDropout):
    """Baseline: a fixed sparse mask keeping only the first ``floor(p_gen * C)`` units, in every mode."""

    kind = "fixed"

    def _train(self, x, dim, ids):
        return self._drop(x, dim)

    def _test(self, x, dim):
        return self._drop(x, dim)

    def _drop(self, x, dim):
        return self._scale(x, self._gen_scale(x.shape[dim], 1.0, 0.0, x.device), dim)


KINDS = {"example_tied": ExampleTiedDropout, "standard": StandardDropout, "fixed": FixedSparseDropout}


def layer_seed(seed: int, name: str) -> int:
    """Independent mask seeds per layer, derived from the run seed and the module name."""
    return _splitmix_int((int(seed) % _U64) ^ (zlib.crc32(name.encode()) << 32)) >> 1
