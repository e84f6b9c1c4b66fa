"""Loop maps as torch functions: checks, batched Jacobian-vector products, and the loop of
any loop model (model/interface.py: LoopedLM, or a published model from formats/) as a
map h → F(h; e).

The analysis takes any torch map f: h → h (a loop model's `loop_map(e, tokens)` or a
textbook map) and reaches its Jacobian J = ∂f/∂h only through JVPs J v (torch.func.jvp),
k at a time under torch.func.vmap.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from stabilitylab.model.interface import LoopModel, Map


def checked_map(f: Map, h: Tensor) -> Tensor:
    """f(h), after checking that h is a finite float tensor and that f returns a finite
    tensor of h's shape, dtype and device (a loop map must map the state space to itself)."""
    if not isinstance(h, Tensor) or not h.is_floating_point():
        raise TypeError(f"the state must be a real floating torch tensor, got {getattr(h, 'dtype', type(h))}")
    if h.numel() == 0:
        raise ValueError("the state is empty")
    if not torch.isfinite(h).all():
        raise ValueError("the state has non-finite entries")
    with torch.no_grad(), math_attention():
        y = f(h)
    if not isinstance(y, Tensor) or (y.shape, y.dtype, y.device) != (h.shape, h.dtype, h.device):
        got = (tuple(y.shape), y.dtype, y.device) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"f maps a state of (shape, dtype, device) {(tuple(h.shape), h.dtype, h.device)} to "
                         f"{got}; a loop map must return a state like its input")
    if not torch.isfinite(y).all():
        raise ValueError(f"f(h) has {int((~torch.isfinite(y)).sum())} non-finite entries at this state")
    return y


def math_attention():
    """Attention by its math definition: forward-mode AD has no rule for the fused kernels."""
    return sdpa_kernel(SDPBackend.MATH)


@torch.no_grad()
def batched_jvp(f: Map, h: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """(f(h), J V): the k tangents V of shape (k, *h.shape) pushed through J = ∂f/∂h at h.

    One torch.func.vmap over torch.func.jvp; f(h) is computed once, as the unbatched primal.
    No autograd graph is built (torch.no_grad does not affect forward-mode AD).
    """
    with math_attention():
        return vmap(lambda v: jvp(f, (h,), (v,)), out_dims=(None, 0))(V)


def orthonormal_rows(n: int, k: int, seed: int) -> Tensor:
    """k orthonormal rows of length n (float64, CPU) from a seeded normal draw, so the same on
    every device; row 0 is the first draw of the generator, normalised."""
    gen = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(k, n, generator=gen, dtype=torch.float64).T)
    return (Q * R.diagonal().sign()).T


def work_dtype(h: Tensor) -> torch.dtype:
    """Linear algebra on tangents runs in at least float32 (there is no bfloat16 QR or eig)."""
    return torch.promote_types(h.dtype, torch.float32)


@torch.no_grad()
def loop_state(model: LoopModel, tokens: Tensor, depth: int,
               h0: Tensor | None = None) -> tuple[Map, Tensor]:
    """(F, h_depth): the loop map F(·; e) of a loop model for `tokens`, and the state after
    `depth` iterations h ← F(h) from h0 (default model.initial_state(e), random unless the
    model's initial state is deterministic). The model is put in eval mode."""
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int ≥ 0, got {depth!r}")
    weight = next(model.parameters())
    if tokens.device != weight.device:
        raise ValueError(f"tokens are on {tokens.device} but the model is on {weight.device}; move one of them")
    model.eval()
    e = model.encode(tokens)
    F = model.loop_map(e, tokens)
    h = model.initial_state(e) if h0 is None else h0
    if h.shape != (*e.shape[:-1], model.state_dim):
        raise ValueError(f"h0 has shape {tuple(h.shape)}, the loop state is {(*e.shape[:-1], model.state_dim)}")
    for _ in range(depth):
        h = F(h)
    return F, h


def position_mask(h: Tensor, position: int) -> tuple[int, Tensor]:
    """(p, mask): position as an index in 0..T−1 for a state (B, T, d), and a (1, T, 1) bool
    mask that is True at p."""
    if h.ndim != 3:
        raise ValueError(f"the per-token view needs a state of shape (B, T, d), got {tuple(h.shape)}")
    T = h.shape[1]
    if not isinstance(position, int) or not -T <= position < T:
        raise ValueError(f"position {position!r} is outside a sequence of length {T}")
    p = position % T
    return p, torch.arange(T, device=h.device).view(1, T, 1) == p


def at_position(f: Map, h: Tensor, position: int) -> tuple[Map, Tensor]:
    """(g, h[:, p]) with g(x) = f(h with h[:, p] replaced by x)[:, p], for a state (B, T, d).

    ∂g/∂x is the diagonal block ∂F(h)[p]/∂h[p] of the loop's Jacobian: how the state at
    position p moves itself, holding the other positions fixed. It ignores how position
    p's state moves other positions (the blocks ∂F[q]/∂h[p], q > p, under causal attention)
    and how they move p. Under causal attention J is block lower-triangular in positions,
    so the union over p of these blocks' eigenvalues is exactly J's spectrum; what the
    per-token view loses is the transient growth of the off-diagonal coupling.
    """
    p, mask = position_mask(h, position)

    def g(x: Tensor) -> Tensor:
        return f(torch.where(mask, x.unsqueeze(1), h))[:, p]

    return g, h[:, p]
