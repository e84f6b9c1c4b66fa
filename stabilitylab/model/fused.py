"""Hand-written derivatives for the two elementwise pieces of a block that autograd
composes slowly on the CPU: the MLP's relu² and RMSNorm.

Autograd differentiates a composite op one primitive at a time, so each primitive's
backward is a pass over the activation (B, T, width). Written by hand:

    relu²:    y = r²,  r = relu(h)          ∂h = 2 r ⊙ ∂y                        (2 passes, not 4)
    RMSNorm:  x̂ = x · s,  s = (mean(x²) + ε)^(−½),  y = w ⊙ x̂
              ∂x = s ⊙ (g − x̂ · mean(g ⊙ x̂)),  g = w ⊙ ∂y                   (4 passes, not 9)
              ∂w = Σ over positions of ∂y ⊙ x̂

The forwards are the very operations of the composites (`r * r`; F.rms_norm's pow, mean,
add, rsqrt and two products), so the values are bit for bit the same. relu²'s gradient is
the same bit for bit too (2·(g·r) = g·r + g·r exactly); RMSNorm's agrees with autograd's
to float rounding (tests/test_fused.py). Both carry a forward derivative (jvp) and a vmap
rule, so torch.func transforms still go through them, and their backwards are themselves
differentiable (second derivatives are exact; gradgradcheck in the tests).

`blocks.py` calls them only while a graph is being built (grad enabled and an input
that requires it) and not under torch.compile, which fuses the composites itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def building_graph(x: Tensor) -> bool:
    """True when autograd will differentiate through x here (eager, grad on, x requires it)."""
    return torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()


class _ReluSquared(torch.autograd.Function):
    """y = relu(h)²; r = relu(h) is a second output, which the derivatives read.

    Both outputs are differentiable (∂h = 2r ⊙ ∂y + [h > 0] ⊙ ∂r), so a backward taken with
    create_graph=True differentiates through r back into this function: second derivatives
    are exact, not silently missing the terms a detached r would drop."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: Tensor) -> tuple[Tensor, Tensor]:
        r = torch.relu(h)
        return r * r, r

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_r: Tensor | None) -> Tensor | None:
        (r,) = ctx.saved_tensors
        out = None if grad is None else (grad * r).mul_(2)
        if grad_r is not None:  # only in a second derivative: the path through r = relu(h)
            through_r = torch.where(r > 0, grad_r, 0.0)
            out = through_r if out is None else out + through_r
        return out

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> tuple[Tensor, Tensor]:
        (r,) = ctx.saved_tensors
        tangent_r = torch.where(r > 0, tangent, 0.0)
        return tangent_r * r * 2, tangent_r


def relu_squared(h: Tensor) -> Tensor:
    """relu(h)², with a two-pass backward when a graph is being built."""
    if building_graph(h):
        return _ReluSquared.apply(h)[0]
    r = torch.relu(h)
    return r * r


def _normalise(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x̂, s): F.rms_norm's own operations, so that x̂ is bit for bit its result."""
    s = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt()
    return x * s, s


def _normalise_grad(g: Tensor | None, grad_s: Tensor | None, x_hat: Tensor, s: Tensor) -> Tensor | None:
    """The derivative of x ↦ (x̂, s) over the last dimension (N channels), transposed, applied to
    (g, grad_s): s ⊙ (g − x̂ · mean(g ⊙ x̂)) − (s²/N) · grad_s · x̂. The Jacobian of x ↦ x̂ is
    symmetric, so the same expression is its forward derivative."""
    out = None
    if g is not None:
        mean = torch.linalg.vecdot(g, x_hat, dim=-1).unsqueeze(-1) / x_hat.shape[-1]
        out = torch.addcmul(g, x_hat, mean, value=-1).mul_(s)
    if grad_s is not None:
        term = x_hat * (grad_s * s * s / x_hat.shape[-1])
        out = -term if out is None else out - term
    return out


class _RMSNorm(torch.autograd.Function):
    """y = w ⊙ x̂ (w = None: y = x̂, the QK-norm); outputs (y, x̂, s), all differentiable
    (see _ReluSquared for why), with y and x̂ the same tensor when there is no gain."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        x_hat, s = _normalise(x, eps)
        return (x_hat if weight is None else x_hat * weight), x_hat, s

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)
        _, x_hat, s = output
        ctx.save_for_backward(x_hat, s, inputs[1])
        ctx.save_for_forward(x_hat, s, inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_x_hat: Tensor | None, grad_s: Tensor | None
                 ) -> tuple[Tensor | None, Tensor | None, None]:
        x_hat, s, weight = ctx.saved_tensors
        grad_w = None
        if grad is not None and weight is not None:
            if ctx.needs_input_grad[1]:
                grad_w = (grad * x_hat).flatten(0, -2).sum(0)
            grad = grad * weight
        if grad_x_hat is not None:
            grad = grad_x_hat if grad is None else grad + grad_x_hat
        grad_x = _normalise_grad(grad, grad_s, x_hat, s) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w, None

    @staticmethod
    def jvp(ctx, tangent_x: Tensor | None, tangent_w: Tensor | None, _eps: None
            ) -> tuple[Tensor, Tensor, Tensor]:
        x_hat, s, weight = ctx.saved_tensors
        if tangent_x is None:
            tangent_x = torch.zeros_like(x_hat)
        tangent_x_hat = _normalise_grad(tangent_x, None, x_hat, s)
        tangent_s = torch.linalg.vecdot(x_hat, tangent_x, dim=-1).unsqueeze(-1) * (-s * s / x_hat.shape[-1])
        tangent_y = tangent_x_hat if weight is None else tangent_x_hat * weight
        if tangent_w is not None:
            tangent_y = tangent_y + x_hat * tangent_w
        return tangent_y, tangent_x_hat, tangent_s


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    """F.rms_norm over the last dimension (ε = float eps of x's dtype when None), with the
    backward above when a graph is being built."""
    fast = x.dtype in (torch.float32, torch.float64)  # F.rms_norm lifts half precision to float32 inside
    if not (fast and (building_graph(x) or (weight is not None and building_graph(weight)))):
        return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return _RMSNorm.apply(x, weight, eps)[0]
