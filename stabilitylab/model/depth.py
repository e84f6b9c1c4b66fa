"""How many loop iterations to run, and which of them carry gradient (docs/parcae.md §2, item 9).

A `Depth` is n iterations without gradient followed by k with gradient (truncated
backprop: only the last k iterations reach the parameters). n and k are ints (the
same for the whole batch) or integer tensors of shape (B,) (per sequence) or (B, T)
(per token). The loop runs max(n) no-grad steps, then max(k) grad steps, and an
element only moves while its own counter runs: h ← where(t < nᵢ, F(h), h).

Samplers draw a Depth from a `ModelConfig` (μ_rec = mean_recurrence,
μ_bwd = backprop_depth):

- fixed:                  n = μ_rec − μ_bwd, k = μ_bwd
- poisson-truncated-full: total = max(1, Poisson(μ_rec)), k = min(total, μ_bwd), n = total − k
- poisson-lognormal:      λ ~ LogNormal(log(μ_rec − μ_bwd) − σ²/2, σ = ½), n = Poisson(λ) + 1,
                          k = μ_bwd (Huginn's scheme; E[λ] = μ_rec − μ_bwd)

Draws are reproducible: they depend only on (seed, step, rank), never on torch's
global RNG, so a resumed run samples the same depths.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from stabilitylab.config import ModelConfig

LOGNORMAL_SIGMA = 0.5


@dataclass(frozen=True)
class Depth:
    """n no-grad iterations, then k iterations with gradient (ints or per-element tensors).

    n_max and k_max, the loop's trip counts, are read once here, on the host, and travel with
    `to(device)`: the loop needs them as ints, and reading them from device tensors would
    stall the device every forward."""

    n: int | Tensor
    k: int | Tensor
    n_max: int = field(init=False, repr=False, compare=False)
    k_max: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n_min, k_min = _min(self.n), _min(self.k)
        if n_min < 0 or k_min < 0:
            raise ValueError(f"depth: n and k must be ≥ 0, got n={self.n}, k={self.k}")
        if _min(self.n + self.k) < 1:
            raise ValueError(
                f"depth: every element needs at least one loop iteration, got n={self.n}, k={self.k}. "
                "Fix: pass depth ≥ 1 (a looped model with depth 0 never reads its input)"
            )
        object.__setattr__(self, "n_max", _max(self.n))
        object.__setattr__(self, "k_max", _max(self.k))

    @classmethod
    def of(cls, total: int, backprop: int) -> "Depth":
        """`total` iterations of which the last min(total, backprop) carry gradient."""
        if not isinstance(total, int) or isinstance(total, bool):
            raise TypeError(f"depth must be an int or a Depth, got {type(total).__name__}")
        if total < 1:
            raise ValueError(f"depth must be ≥ 1, got {total}. Fix: pass depth ≥ 1 "
                             "(a looped model with depth 0 never reads its input)")
        k = min(total, backprop)
        return cls(total - k, k)

    @property
    def uniform(self) -> bool:
        """True when every element runs the same n and k (no gating needed)."""
        return isinstance(self.n, int) and isinstance(self.k, int)

    @property
    def total_max(self) -> int:
        return self.n_max + self.k_max

    def mean(self) -> tuple[float, float]:
        """(mean n, mean k) over the elements, for logging."""
        return _mean(self.n), _mean(self.k)

    def to(self, device: torch.device | str) -> "Depth":
        """The same depths with their tensors on `device` (checked and measured already)."""
        moved = copy.copy(self)
        for name in ("n", "k"):
            value = getattr(self, name)
            if isinstance(value, Tensor):
                object.__setattr__(moved, name, value.to(device))
        return moved


def _min(x: int | Tensor) -> int:
    return int(x.min()) if isinstance(x, Tensor) else int(x)


def _max(x: int | Tensor) -> int:
    return int(x.max()) if isinstance(x, Tensor) else int(x)


def _mean(x: int | Tensor) -> float:
    return float(x.float().mean()) if isinstance(x, Tensor) else float(x)


def fixed_depth(cfg: ModelConfig) -> Depth:
    """n = μ_rec − μ_bwd, k = μ_bwd (μ_bwd capped at μ_rec)."""
    return Depth.of(cfg.mean_recurrence, cfg.mu_bwd)


def sample_depth(cfg: ModelConfig, step: int, seed: int, batch: int, seq_len: int, rank: int = 0) -> Depth:
    """Draw the depths of one training step under cfg.depth_scheme and
    cfg.depth_granularity (one draw per batch, per sequence, or per token)."""
    if cfg.depth_scheme == "fixed":
        return fixed_depth(cfg)
    rng = np.random.default_rng([seed, step, rank, 0x10095])
    shape = {"batch": (), "sequence": (batch,), "token": (batch, seq_len)}[cfg.depth_granularity]
    mu, mu_bwd = cfg.mean_recurrence, cfg.mu_bwd
    if cfg.depth_scheme == "poisson-truncated-full":
        total = np.maximum(rng.poisson(mu, size=shape), 1)
        k = np.minimum(total, mu_bwd)
        n = total - k
    else:  # poisson-lognormal (Huginn)
        rest = max(mu - mu_bwd, 1e-6)
        rate = rng.lognormal(math.log(rest) - LOGNORMAL_SIGMA**2 / 2, LOGNORMAL_SIGMA, size=shape)
        n = rng.poisson(rate) + 1
        k = np.full(shape, mu_bwd)
    if shape == ():
        return Depth(int(n), int(k))
    return Depth(torch.as_tensor(n, dtype=torch.long), torch.as_tensor(k, dtype=torch.long))
