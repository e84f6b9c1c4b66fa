"""The loop interface: what the lab asks of any looped LM, ours or a published one.

A looped LM, seen as a dynamical system:

    e      = encode(tokens)                  (B, T, d_e): what the prompt contributes
    h_0    = initial_state(e, generator)     (B, T, state_dim)
    h_t+1  = F(h_t),  F = loop_map(e, tokens)   pure: a function of h alone
    logits = decode(h_T, tokens)             (B, T, vocab_size), float32

Everything the lab measures (ρ(∂F/∂h), Lyapunov exponents, state growth, the loss at
depth, `check`, `analyze`) reaches a model through these five methods and five numbers,
so it runs unchanged on LoopedLM and on every adapter in stabilitylab/formats/.

The state is one tensor (B, T, state_dim). A model with two nested states, as HRM's
(z_H, z_L), concatenates them on the last axis; its F splits, updates and re-joins them.
F must be pure and torch.func-safe: no in-place update of captured tensors, no Python
branching on values, attention through a kernel with forward-mode AD (PyTorch's math SDPA
or eager matmuls), so torch.func.jvp and vmap can push tangents through it.

linear_part() is (Ā, B̄) where the injection is linear in (h, e), h ↦ Ā h + B̄ e: Ā a
(state_dim,) diagonal or a (state_dim, state_dim) matrix, B̄ (state_dim, d_e). It is None
where there is no such part (no injection at all, or a nonlinear one); bounds that need
it (ρ(Ā), ‖B̄‖₂) then report "not applicable" with the reason `linear_part_reason`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

Map = Callable[[Tensor], Tensor]


class LinearPart(NamedTuple):
    """The injection's linear part h ↦ Ā h + B̄ e: A is Ā, B is B̄."""

    A: Tensor
    B: Tensor


@runtime_checkable
class LoopModel(Protocol):
    """A looped LM as the lab sees it (module docstring). LoopedLM implements it, and so
    does every model that stabilitylab.formats.load returns.

    vocab_size: logits' last axis; block_size: the longest sequence it takes; state_dim:
    the state's last axis; mu_rec: the depth it was trained to run (its default depth);
    mu_bwd: the iterations that carried gradient in training.
    """

    vocab_size: int
    block_size: int
    state_dim: int
    mu_rec: int
    mu_bwd: int

    def encode(self, tokens: Tensor) -> Tensor: ...

    def initial_state(self, e: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def loop_map(self, e: Tensor, tokens: Tensor | None = None) -> Map: ...

    def decode(self, h: Tensor, tokens: Tensor | None = None) -> Tensor: ...

    def linear_part(self) -> LinearPart | None: ...


def linear_part_reason(model: LoopModel) -> str:
    """Why a model has no linear part (its `no_linear_part` attribute, or a generic line)."""
    return getattr(model, "no_linear_part", "its injection has no linear part h ↦ Ā h + B̄ e")


def has_loop(model: object) -> bool:
    """False for a model that implements the interface but runs no loop (the GPT baseline)."""
    return getattr(model, "looped", True)


@torch.no_grad()
def run_loop(model: LoopModel, tokens: Tensor, depth: int, h0: Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, list[Tensor]]:
    """(logits after `depth` iterations, the states [h_0, h_1, ..., h_depth]) of a loop model
    on tokens, from h0 (default initial_state(e, generator)): the forward pass written with
    the interface alone, in eval mode and without gradient."""
    e = model.encode(tokens)
    F = model.loop_map(e, tokens)
    h = model.initial_state(e, generator) if h0 is None else h0
    states = [h]
    for _ in range(depth):
        h = F(h)
        states.append(h)
    return model.decode(h, tokens), states


__all__ = ["Map", "LinearPart", "LoopModel", "linear_part_reason", "has_loop", "run_loop"]
