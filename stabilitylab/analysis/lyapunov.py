"""Lyapunov exponents of the loop: how fast nearby orbits h_{t+1} = F(h_t) separate.

QR (Benettin) method. Push k orthonormal tangent vectors Q_t (n × k) through the
Jacobian along the orbit and re-orthonormalise every step:

    Z_t = J(h_t) Q_t          (k JVPs, one vmap over torch.func.jvp)
    Z_t = Q_{t+1} R_t         (thin QR, R_t upper triangular)
    λᵢ  ≈ (1/N) Σ_t log|(R_t)ᵢᵢ|

The λᵢ are the k leading exponents (per iteration, natural log), λ₁ ≥ … ≥ λ_k. Since
|det Q| = 1, Σᵢ log|(R_t)ᵢᵢ| = log|det J(h_t)| when k = n: the exponents sum to the mean
log|det J| along the orbit. For a linear map h ↦ A h they are log|eigenvalues of A|.

Twin trajectories (finite-time Lyapunov exponent): follow h and h' = h + δu, measure the
separation s_t = ‖h'_t − h_t‖ every step, add log(s_t/δ), and pull h' back to distance δ.
In the limit δ → 0 this is Benettin's first column, computed without derivatives: an
independent check of λ₁.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from stabilitylab.analysis.maps import (Map, batched_jvp, checked_map, loop_state, math_attention, orthonormal_rows,
                                       position_mask, work_dtype)
from stabilitylab.model.interface import LoopModel


@dataclass
class LyapunovSpectrum:
    """The k leading Lyapunov exponents of an orbit of `steps` iterations (after `burn_in`).

    exponents: (k,) per iteration, descending; running: (steps, k), the estimate after each
    step (row t averages steps 0..t; columns in the order of `exponents`); conditioning:
    (steps,), maxᵢ|(R_t)ᵢᵢ| / minᵢ|(R_t)ᵢᵢ|, a lower bound on cond₂(R_t) = cond₂(J(h_t) Q_t):
    how unequally one step stretched the frame. Where it nears 1/eps of the dtype, the
    trailing tangent vectors drown in rounding and their exponents are not to be trusted.
    """

    exponents: np.ndarray
    running: np.ndarray
    conditioning: np.ndarray
    steps: int
    burn_in: int

    def to_dict(self) -> dict[str, Any]:
        return {"exponents": self.exponents.tolist(), "running": self.running.tolist(),
                "conditioning": self.conditioning.tolist(), "steps": self.steps, "burn_in": self.burn_in}


@dataclass
class FiniteTimeLyapunov:
    """The largest Lyapunov exponent from twin trajectories: exponent (per iteration),
    running (steps,) estimates, and the separation δ they were kept at."""

    exponent: float
    running: np.ndarray
    steps: int
    burn_in: int
    delta: float

    def to_dict(self) -> dict[str, Any]:
        return {"exponent": self.exponent, "running": self.running.tolist(), "steps": self.steps,
                "burn_in": self.burn_in, "delta": self.delta}


def _check_counts(steps: int, burn_in: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int ≥ 1, got {steps!r}")
    if not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in must be an int ≥ 0, got {burn_in!r}")


def _first_bad(finite: Tensor) -> int:
    """Index of the first False in a bool vector, or −1."""
    bad = (~finite).nonzero()
    return int(bad[0]) if len(bad) else -1


def _benettin(f: Map, h: Tensor, steps: int, k: int, burn_in: int, seed: int,
              embed: Callable[[Tensor], Tensor], project: Callable[[Tensor], Tensor], m: int) -> LyapunovSpectrum:
    """The QR method for tangents living in an m-dimensional subspace of the state:
    embed maps (k, m) tangents to (k, *h.shape), project maps (k, *h.shape) back to (k, m)."""
    if not 1 <= k <= m:
        raise ValueError(f"k = {k} exponents asked of a {m}-dimensional tangent space; choose 1 ≤ k ≤ {m}")
    work = work_dtype(h)
    Q = orthonormal_rows(m, k, seed).to(device=h.device, dtype=work)  # (k, m), rows orthonormal
    logs = torch.empty(steps, k, dtype=torch.float64, device=h.device)
    finite = torch.empty(burn_in + steps, dtype=torch.bool, device=h.device)
    for t in range(burn_in + steps):
        h, Z = batched_jvp(f, h, embed(Q.to(h.dtype)))
        Qt, R = torch.linalg.qr(project(Z).to(work).T)  # Z_t = Q_{t+1} R_t, (m, k) and (k, k)
        Q = Qt.T
        finite[t] = torch.isfinite(h).all()
        if t >= burn_in:
            logs[t - burn_in] = R.diagonal().abs().double().log()
    bad = _first_bad(finite)
    if bad >= 0:
        raise ValueError(f"the orbit left the finite numbers at step {bad + 1}: f(h) has non-finite entries")
    running = logs.cumsum(0) / torch.arange(1, steps + 1, device=h.device, dtype=torch.float64)[:, None]
    order = torch.argsort(running[-1], descending=True, stable=True)
    running = running[:, order].cpu().numpy()
    cond = torch.exp(logs.max(1).values - logs.min(1).values).cpu().numpy()
    return LyapunovSpectrum(exponents=running[-1].copy(), running=running, conditioning=cond,
                            steps=steps, burn_in=burn_in)


def lyapunov_spectrum(f: Map, h0: Tensor, steps: int, k: int | None = None, burn_in: int = 0,
                      seed: int = 0) -> LyapunovSpectrum:
    """The k leading Lyapunov exponents of the orbit h_{t+1} = f(h_t) from h0, by the QR method.

    f: any torch map from a state of h0's shape to the same shape; the state is flattened to
    n = h0.numel() entries. k: exponents wanted (default all n). burn_in: iterations that
    move the orbit and align the tangent frame before averaging starts (the answer then
    averages `steps` further iterations). seed: the initial frame (row 0 is the first
    normal draw, the same start as finite_time_lyapunov's perturbation for the same seed).
    Each step costs one vmapped JVP of k tangents (which also gives f(h)) and an n × k QR.
    """
    _check_counts(steps, burn_in)
    checked_map(f, h0)
    n = h0.numel()
    shape = h0.shape
    return _benettin(f, h0, steps, n if k is None else k, burn_in, seed,
                     embed=lambda V: V.reshape(-1, *shape), project=lambda Z: Z.reshape(Z.shape[0], n), m=n)


@torch.no_grad()
def finite_time_lyapunov(f: Map, h0: Tensor, steps: int, burn_in: int = 0, delta: float | None = None,
                         seed: int = 0) -> FiniteTimeLyapunov:
    """λ₁ from twin trajectories h and h' = h + δu, renormalised to distance δ every step.

        s_t = ‖f(h'_t) − f(h_t)‖,   λ₁ ≈ (1/N) Σ_t log(s_t / δ),   h'_{t+1} = h_{t+1} + δ (f(h'_t) − f(h_t)) / s_t

    u is a seeded unit vector (the same as lyapunov_spectrum's first tangent for the same
    seed). δ defaults to √eps(dtype) · max(1, ‖h0‖): large enough that rounding (≈ eps·‖h‖/δ)
    and small enough that curvature (≈ δ) both stay near √eps, relative. burn_in iterations
    come first and are not averaged. Uses f only, no derivatives.
    """
    _check_counts(steps, burn_in)
    checked_map(f, h0)
    h = h0
    if delta is None:
        delta = float(torch.finfo(h.dtype).eps) ** 0.5 * max(1.0, float(h.double().norm()))
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    u = orthonormal_rows(h.numel(), 1, seed)[0].view(h.shape).to(device=h.device)
    g = (h.double() + delta * u).to(h.dtype)
    logs = torch.empty(steps, dtype=torch.float64, device=h.device)
    finite = torch.empty(burn_in + steps, dtype=torch.bool, device=h.device)
    with math_attention():
        for t in range(burn_in + steps):
            h, g = f(h), f(g)
            d = (g - h).double()
            s = d.norm()
            finite[t] = torch.isfinite(h).all() & torch.isfinite(s) & (s > 0)
            if t >= burn_in:
                logs[t - burn_in] = torch.log(s / delta)
            g = (h.double() + d * (delta / s)).to(h.dtype)
    bad = _first_bad(finite)
    if bad >= 0:
        raise ValueError(f"the twin trajectories failed at step {bad + 1}: f(h) is non-finite, or the twins "
                         "merged (separation 0, so raise delta)")
    running = (logs.cumsum(0) / torch.arange(1, steps + 1, dtype=torch.float64, device=h.device)).cpu().numpy()
    return FiniteTimeLyapunov(exponent=float(running[-1]), running=running, steps=steps, burn_in=burn_in,
                              delta=delta)


def loop_lyapunov(model: LoopModel, tokens: Tensor, depth: int, k: int = 8, burn_in: int = 0,
                  position: int | None = None, h0: Tensor | None = None, seed: int = 0) -> LyapunovSpectrum:
    """The k leading Lyapunov exponents of a loop model's own orbit h_0 → h_depth (LoopedLM
    or any implementation of model/interface.py).

    encode(tokens) → h0 (initial_state, or the given one) → the QR method along depth
    iterations of F, of which the first burn_in only align the tangent frame (so the
    answer averages depth − burn_in iterations: finite-time exponents of the loop as run).
    Whole-sequence view (position=None): tangents span the whole state (B, T, d), n = B·T·d.
    Per-token view (position=p): tangents live at position p and are measured there, so
    the cocycle is the diagonal block ∂F(h_t)[p]/∂h[p] along the orbit (see
    maps.at_position: it ignores how position p moves the other positions), m = B·d.
    Runs on the device of model and tokens, in the model's dtype.
    """
    if not isinstance(depth, int) or not 0 <= burn_in < depth:
        raise ValueError(f"need 0 ≤ burn_in < depth, got burn_in={burn_in!r}, depth={depth!r}")
    F, h = loop_state(model, tokens, 0, h0)
    if position is None:
        return lyapunov_spectrum(F, h, depth - burn_in, k=k, burn_in=burn_in, seed=seed)
    _check_counts(depth - burn_in, burn_in)
    checked_map(F, h)
    p, mask = position_mask(h, position)
    B, _, d = h.shape
    return _benettin(F, h, depth - burn_in, k, burn_in, seed,
                     embed=lambda V: torch.where(mask, V.view(-1, B, 1, d), 0.0),
                     project=lambda Z: Z[:, :, p].reshape(Z.shape[0], B * d), m=B * d)
