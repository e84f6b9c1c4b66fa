"""Every-step estimates of the loop's expansion, cheap enough to run beside training.

Two signals, both per training step:

1. `RadiusTracker`: ρ(J), J = ∂F/∂h at the loop's last iterate h_T, by a block Krylov
   method that spends one batched JVP of `block` tangents per step and carries its
   subspace over from the previous step (a warm start), on a few positions of the
   training batch (`probe_view`). Over steps it is an explicitly restarted block Arnoldi:

       step:     X (n × b) orthonormal to V,   Y = J_s X   (b JVPs, one vmapped call)
                 V ← [V X],  W ← [W Y],  Ritz pairs (θᵢ, yᵢ) of H = Vᵀ W,  ρ̂_s = |θ₁|
       extend:   X ← orth(Y ⊥ V)                                the next Krylov block
       restart:  once V holds `memory` columns: X ← orth(real span of W y₁..y_b),
                 V, W ← empty                                    a free power step

   With J fixed (a frozen model, the same batch) this converges like restarted Arnoldi:
   on the tiny models of tests/test_estimate.py to 1% in 4–13 steps (parcae, concat,
   stable-dense; measured with memory 16: 8 was not enough where moduli cluster). In
   training J_s changes every step (weights and batch), so the images W of one cycle are
   up to memory/b steps stale: ρ̂ is the radius of a Jacobian averaged over the last few
   steps, and every restart starts from fresh images. Why not plain power iteration:
   a real J has conjugate pairs at the top (power iteration oscillates on them) and
   moduli that cluster (it then converges like |λ₂/λ₁|ᵗ); the b-dimensional Ritz step
   handles pairs and the Krylov memory handles clusters.

2. `trace_rate`: the contraction rate of the training forward's own last iterations,
   from its LoopTrace (no extra forward): q = (δ_T / δ_m)^(1/(T − m)) over the second
   half of the iterations, δ_t = mean ‖h_t − h_{t−1}‖ — the formula the offline warning
   uses (analysis.events.loop_rate), on the training batch instead of the probe batch.
   For h ← Āh + b it tends to ρ(Ā); for the real loop to the leading Jacobian modulus
   along the orbit (the power iteration the loop runs on its own increments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from stabilitylab.analysis.maps import Map, at_position, batched_jvp, orthonormal_rows, position_mask, work_dtype
from stabilitylab.model import LoopedLM

BLOCK = 2  # JVPs per step: two carry a conjugate pair
MEMORY = 16  # basis columns before a restart: 8 steps of 2 JVPs (8 was too few where moduli cluster)


@dataclass(frozen=True)
class RadiusEstimate:
    """One step's estimate: radius = |θ₁|, theta = θ₁ (complex), residual = ‖J x − θ₁ x‖/|θ₁|
    for the Ritz vector x (of a possibly stale J), basis = columns it came from, jvps = spent
    so far in all."""

    radius: float
    theta: complex
    residual: float
    basis: int
    jvps: int


class RadiusTracker:
    """ρ(∂F/∂h) tracked over steps with `block` JVPs per `update` (module docstring).

    One tracker follows one state shape; a new shape (another batch size) starts it again.
    State lives on the state's device, in float32 or float64 (the state's dtype, at least
    float32); the Rayleigh-Ritz step runs in float64.
    """

    def __init__(self, block: int = BLOCK, memory: int = MEMORY, seed: int = 0):
        if not 1 <= block <= memory:
            raise ValueError(f"RadiusTracker: need 1 ≤ block ≤ memory, got block={block}, memory={memory}")
        self.block, self.memory, self.seed = block, memory, seed
        self.jvps = 0
        self._shape: tuple[int, ...] | None = None
        self._X: Tensor | None = None  # the next directions, n × b
        self._V: Tensor | None = None  # basis of this cycle, n × c
        self._W: Tensor | None = None  # its images, n × c

    def reset(self) -> None:
        """Forget the subspace (the next update starts from seeded random directions)."""
        self._shape = self._X = self._V = self._W = None

    @torch.no_grad()
    def update(self, f: Map, h: Tensor) -> RadiusEstimate:
        """Spend one batched JVP of `block` tangents of J = ∂f/∂h at h and return the estimate.
        A non-finite h or J X raises ValueError; the subspace is then reset."""
        if not torch.isfinite(h).all():
            self.reset()
            raise ValueError("the state has non-finite entries: no Jacobian there")
        n = h.numel()
        dtype = work_dtype(h)
        if self._shape != tuple(h.shape) or self._X is None or self._X.dtype != dtype or self._X.device != h.device:
            self._shape = tuple(h.shape)
            b = min(self.block, n)
            self._X = orthonormal_rows(n, b, self.seed).to(device=h.device, dtype=dtype).T
            self._V = self._W = None
        X = self._X
        _, Z = batched_jvp(f, h, X.T.to(h.dtype).reshape(X.shape[1], *h.shape))
        Y = Z.reshape(X.shape[1], -1).T.to(dtype)
        self.jvps += X.shape[1]
        if not torch.isfinite(Y).all():
            self.reset()
            raise ValueError("J v has non-finite entries at this state")
        V = X if self._V is None else torch.cat([self._V, X], 1)
        W = Y if self._W is None else torch.cat([self._W, Y], 1)
        theta, coefficients, residual = _ritz(V, W)
        if V.shape[1] + X.shape[1] > min(self.memory, n):
            # restart: a power step on the leading Ritz vectors, whose images W y are known
            lead = coefficients[:, :X.shape[1]]
            images = W.double() @ torch.cat([lead.real, lead.imag], 1)
            self._X, self._V, self._W = _orthonormal_basis(images, X.shape[1], self.seed).to(dtype), None, None
        else:
            self._X = _complement(Y, V, self.seed + V.shape[1])
            self._V, self._W = V, W
        return RadiusEstimate(radius=float(theta.abs()), theta=complex(theta), residual=residual,
                              basis=V.shape[1], jvps=self.jvps)

    def state_dict(self) -> dict:
        """The subspace (to checkpoint with a run, so that a resumed estimate stays warm)."""
        return {"jvps": self.jvps, "shape": self._shape, "X": self._X, "V": self._V, "W": self._W}

    def load_state_dict(self, state: dict) -> None:
        self.jvps, self._X, self._V, self._W = state["jvps"], state["X"], state["V"], state["W"]
        self._shape = None if state["shape"] is None else tuple(state["shape"])


def _ritz(V: Tensor, W: Tensor) -> tuple[Tensor, Tensor, float]:
    """(θ₁, the Ritz vectors' coefficients in V (columns yᵢ, by modulus of θᵢ descending), the
    leading relative residual ‖W y₁ − θ₁ V y₁‖ / |θ₁|), in float64."""
    V, W = V.double(), W.double()
    theta, Y = torch.linalg.eig(V.T @ W)
    order = torch.argsort(theta.abs(), descending=True, stable=True)
    theta, Y = theta[order], Y[:, order]
    y = Y[:, 0]
    r = torch.complex(W @ y.real, W @ y.imag) - theta[0] * torch.complex(V @ y.real, V @ y.imag)
    scale = float(theta[0].abs())
    residual = float(r.norm()) / scale if scale > 0 else float("inf")
    return theta[0], Y, residual


def _orthonormal_basis(M: Tensor, width: int, seed: int) -> Tensor:
    """`width` orthonormal columns spanning M's leading directions (SVD), topped up with seeded
    random directions where M has fewer independent columns (a real eigenvector)."""
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    keep = U[:, S > 1e-10 * S[0].clamp_min(torch.finfo(S.dtype).tiny)][:, :width]
    if keep.shape[1] < width:
        extra = _complement(orthonormal_rows(M.shape[0], width, seed).T.to(M), keep, seed)
        keep = torch.cat([keep, extra[:, :width - keep.shape[1]]], 1)
    return keep


def _complement(Y: Tensor, V: Tensor, seed: int) -> Tensor:
    """Y's columns made orthonormal and orthogonal to V's (Gram-Schmidt twice, then QR); a
    column with nothing left is replaced by a seeded random direction."""
    gen = torch.Generator().manual_seed(seed)
    Y = Y.clone()
    for _ in range(3):
        for _ in range(2):
            Y = Y - V @ (V.T @ Y)
        Q, R = torch.linalg.qr(Y)
        lost = R.diagonal().abs() <= 1e-6 * Y.norm(dim=0).max().clamp_min(torch.finfo(Y.dtype).tiny)
        if not bool(lost.any()):
            return Q
        Y = torch.where(lost, torch.randn(Y.shape, generator=gen, dtype=torch.float64).to(Y), Y)
    return Q


# ---- where on the training batch ------------------------------------------------------------------

def probe_view(F: Map, h: Tensor, position: int = -1) -> tuple[Map, Tensor]:
    """The per-token view of the loop map at `position` of each sequence of a (B, T, d) state
    (analysis.maps.at_position): J is the diagonal block ∂F[p]/∂h[p], n = B·d, and its radius
    is the largest over the B sequences (they do not interact). A state of another shape is
    used whole."""
    if h.ndim != 3:
        return F, h
    position_mask(h, position)
    return at_position(F, h, position)


def causal_prefix(tokens: Tensor, state: Tensor, position: int, rows: int) -> tuple[Tensor, Tensor, int]:
    """(tokens[:rows, :p+1], state[:rows, :p+1], −1): the first `rows` sequences cut after
    position p. Under causal attention the loop map at positions ≤ p reads only positions
    ≤ p, so the block ∂F[p]/∂h[p] is the same on the prefix, at a fraction of the cost."""
    p, _ = position_mask(state, position)
    return tokens[:rows, :p + 1], state[:rows, :p + 1], -1


def last_position_map(model: LoopedLM, tokens: Tensor) -> Callable[[Tensor], tuple[Tensor, Map]]:
    """For the loop map F(·; e) of `tokens`: h ↦ (F(h), g_h) with g_h(x) = F(h with h[:, p] = x)[:, p]
    at the last position p = T − 1, the per-token view whose Jacobian is ∂F[p]/∂h[p].

    Under causal attention the positions before p never see p, so their keys and values
    in every core block are constants of h: they are cached while computing F(h), and
    g_h runs the core blocks on the single position p against them (Block's `past`). A JVP
    of g_h then carries its tangent through one position instead of all T. The same
    numbers as the forward's loop to float rounding (tested against at_position).
    LoopedLM-only (its blocks, value embeddings and RoPE tables): the loop interface has
    no per-position step; other models take the interface's path (probe_view). Only g_h
    needs the math attention kernel (for its JVPs); h ↦ F(h) runs on any.
    """
    e = model.encode(tokens)
    injection, blocks = model.injection, list(model.core)
    A, u = injection.transition(), injection.drive(e)
    P = model.cfg.n_prelude
    ves = model._value_embeds(tokens, range(P, P + len(blocks)))
    ropes = [model._rope(block) for block in blocks]

    def step(h: Tensor, image: bool = True) -> tuple[Tensor | None, Map]:
        """(F(h), g_h); image=False skips F(h) (the last block's output: g_h needs only
        the keys and values of its input) and returns (None, g_h)."""
        z, pasts = injection.step(h, A, u), []
        for i, (block, rope, ve) in enumerate(zip(blocks, ropes, ves)):
            k, v = block.keys_values(z, rope, ve)
            pasts.append((k[:, :-1], v[:, :-1]))
            z = block(z, rope, ve) if image or i < len(blocks) - 1 else None

        def g(x: Tensor) -> Tensor:
            y = injection.step(x[:, None], A, u[:, -1:])
            for block, rope, ve, past in zip(blocks, ropes, ves, pasts):
                y = block(y, rope, None if ve is None else ve[:, -1:], past)
            return y[:, 0]

        return z, g

    return step


# ---- the loop trace ---------------------------------------------------------------------------------

def trace_rate(delta: Tensor | np.ndarray | list[float]) -> float:
    """q = (δ_T / δ_m)^(1/(T − m)), m = ⌈T/2⌉, from the mean increments δ_t of one forward's
    loop trace (LoopTrace.delta_norm_mean). NaN with fewer than two iterations or a zero
    δ_m (a loop that has stopped moving); inf when the trace overflowed."""
    d = np.asarray(delta.detach().cpu() if isinstance(delta, Tensor) else delta, dtype=float)
    T = d.size
    if T < 2:
        return float("nan")
    m = (T + 1) // 2
    last, mid = d[-1], d[m - 1]
    if not (np.isfinite(last) and np.isfinite(mid)):
        return float("inf")
    if mid == 0:
        return float("nan")
    return float((last / mid) ** (1.0 / (T - m)))


__all__ = ["BLOCK", "MEMORY", "RadiusEstimate", "RadiusTracker", "probe_view", "causal_prefix", "last_position_map",
           "trace_rate"]
