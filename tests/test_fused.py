"""The hand-written derivatives of relu² and RMSNorm (model/fused.py) against autograd's
composites: the same values bit for bit, the same gradients (relu²: bit for bit; RMSNorm:
to float rounding), the same forward derivatives under torch.func, and a clear refusal of
a second derivative."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jvp, vmap

from stabilitylab.model.fused import relu_squared, rms_norm

SHAPES = [(2, 5, 16), (3, 4, 2, 8)]


def composite_relu_squared(h):
    r = F.relu(h)
    return r * r


def composite_rms_norm(x, weight=None, eps=None):
    return F.rms_norm(x, x.shape[-1:], weight, eps)


@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES), scale=st.sampled_from([1e-3, 1.0, 1e3]))
@settings(max_examples=30, deadline=None)
def test_relu_squared_value_and_gradient_are_autograds_bit_for_bit(seed, shape, scale):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(shape, generator=g) * scale).requires_grad_()
    grad = torch.randn(shape, generator=g)
    ours, theirs = relu_squared(h), composite_relu_squared(h)
    assert torch.equal(ours, theirs)
    assert torch.equal(*(torch.autograd.grad(y, h, grad)[0] for y in (ours, theirs)))


@pytest.mark.parametrize("with_weight", [True, False])
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES), scale=st.sampled_from([1e-3, 1.0, 1e3]))
@settings(max_examples=30, deadline=None)
def test_rms_norm_value_is_F_rms_norms_bit_for_bit_and_its_gradient_to_rounding(with_weight, seed, shape, scale):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).requires_grad_()
    weight = (torch.rand(shape[-1], generator=g) + 0.5).requires_grad_() if with_weight else None
    eps = 1e-5 if with_weight else None
    grad = torch.randn(shape, generator=g)
    ours, theirs = rms_norm(x, weight, eps), composite_rms_norm(x, weight, eps)
    assert torch.equal(ours, theirs)
    inputs = [x, weight] if with_weight else [x]
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_rms_norm_gradient_matches_float64_finite_differences():
    """A known answer independent of autograd's composite: gradcheck in float64."""
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64).add(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda x: rms_norm(x), (x,))
    assert torch.autograd.gradcheck(relu_squared, (x,))


@pytest.mark.parametrize("fn, composite, fused_node", [
    (lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: composite_rms_norm(x, w, 1e-5), "_RMSNormBackward"),
    (lambda x, w: rms_norm(x), lambda x, w: composite_rms_norm(x), "_RMSNormBackward"),
    (lambda x, w: relu_squared(x), lambda x, w: composite_relu_squared(x), "_ReluSquaredBackward"),
])
def test_forward_derivatives_under_torch_func_match_the_composites(fn, composite, fused_node):
    """With grad enabled and inputs that require it (a model's activations outside no_grad),
    jvp and vmap(jvp) go through the hand-written jvp and the generated vmap rule."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 5, 8, dtype=torch.float64), torch.rand(8, dtype=torch.float64).add(0.5).requires_grad_()
    one = torch.ones((), dtype=torch.float64, requires_grad=True)  # makes the input part of a graph
    tangents = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    assert type(fn(x * one, w).grad_fn).__name__ == fused_node
    ours = vmap(lambda v: jvp(lambda x: fn(x * one, w), (x,), (v,)), out_dims=(None, 0))(tangents)
    theirs = vmap(lambda v: jvp(lambda x: composite(x * one, w), (x,), (v,)), out_dims=(None, 0))(tangents)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_second_derivatives_are_exact():
    """Backward with create_graph=True differentiates through the hand-written backward:
    gradgradcheck in float64, and a Hessian-vector product equal to the composite's."""
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64).add(0.5).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))
    assert torch.autograd.gradgradcheck(lambda x: rms_norm(x), (x,))
    assert torch.autograd.gradgradcheck(relu_squared, (x,))
    v = torch.randn_like(x)
    for ours, theirs in [(lambda x: rms_norm(x, w, 1e-5), lambda x: composite_rms_norm(x, w, 1e-5)),
                         (relu_squared, composite_relu_squared)]:
        hvps = []
        for f in (ours, theirs):
            (g,) = torch.autograd.grad(f(x).pow(3).sum(), x, create_graph=True)
            hvps.append(torch.autograd.grad((g * v).sum(), (x, w), allow_unused=True))
        for a, b in zip(*hvps):
            if a is None or b is None:
                assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            else:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_without_a_graph_and_in_half_precision_the_composites_run():
    x = torch.randn(4, 8)
    assert rms_norm(x, torch.ones(8), 1e-5).grad_fn is None
    assert type(rms_norm(x.requires_grad_(), torch.ones(8), 1e-5).grad_fn).__name__ == "_RMSNormBackward"
    xh = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    assert torch.equal(rms_norm(xh), composite_rms_norm(xh))  # lifted to float32 inside, as F.rms_norm does
    assert not type(rms_norm(xh).grad_fn).__name__.startswith("_RMSNorm")
