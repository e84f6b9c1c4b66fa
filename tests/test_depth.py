"""Depth samplers: reproducible, the right distributions, clear errors."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import stabilitylab as sl
from stabilitylab.model.depth import fixed_depth


def cfg(**kw) -> sl.ModelConfig:
    return sl.ModelConfig(**{**dict(mean_recurrence=8, backprop_depth=4), **kw})


@pytest.mark.parametrize("scheme", ["poisson-truncated-full", "poisson-lognormal"])
@pytest.mark.parametrize("granularity", ["batch", "sequence", "token"])
def test_sampling_is_reproducible_from_seed_and_step(scheme, granularity):
    c = cfg(depth_scheme=scheme, depth_granularity=granularity)
    a = sl.sample_depth(c, step=7, seed=1, batch=4, seq_len=6)
    b = sl.sample_depth(c, step=7, seed=1, batch=4, seq_len=6)
    torch.manual_seed(123)  # torch's global RNG plays no part
    c_ = sl.sample_depth(c, step=7, seed=1, batch=4, seq_len=6)
    for x in (b, c_):
        assert torch.equal(torch.as_tensor(a.n), torch.as_tensor(x.n))
        assert torch.equal(torch.as_tensor(a.k), torch.as_tensor(x.k))
    shape = {"batch": (), "sequence": (4,), "token": (4, 6)}[granularity]
    assert tuple(torch.as_tensor(a.n).shape) == shape


def test_different_steps_and_ranks_draw_differently():
    c = cfg(depth_granularity="sequence")
    draws = {tuple(sl.sample_depth(c, step=s, seed=0, batch=64, seq_len=1, rank=r).n.tolist())
             for s in range(3) for r in range(2)}
    assert len(draws) == 6


@given(mu=st.integers(1, 20), bwd=st.integers(0, 20), step=st.integers(0, 10_000))
def test_poisson_truncated_full_splits_each_total_into_no_grad_then_grad(mu, bwd, step):
    c = cfg(mean_recurrence=mu, backprop_depth=bwd)
    d = sl.sample_depth(c, step=step, seed=0, batch=32, seq_len=1)
    total = d.n + d.k
    assert (total >= 1).all()
    assert torch.equal(d.k, torch.clamp(total, max=bwd))


def test_poisson_truncated_full_has_the_poisson_mean():
    d = sl.sample_depth(cfg(), step=0, seed=0, batch=200_000, seq_len=1)
    total = (d.n + d.k).double()
    assert float(total.mean()) == pytest.approx(8.0, abs=0.03)
    assert float(total.var()) == pytest.approx(8.0, rel=0.03)


def test_huginn_lognormal_scheme_has_mean_rest_plus_one_and_fixed_k():
    d = sl.sample_depth(cfg(depth_scheme="poisson-lognormal"), step=0, seed=0, batch=200_000, seq_len=1)
    assert float(d.n.double().mean()) == pytest.approx(8 - 4 + 1, rel=0.02)
    assert (d.k == 4).all()
    # overdispersed relative to a Poisson of the same mean: that is the lognormal's job
    assert float(d.n.double().var()) > 1.5 * float(d.n.double().mean() - 1)


def test_fixed_scheme_and_evaluation_depth():
    assert sl.sample_depth(cfg(depth_scheme="fixed"), 3, 0, 2, 2) == sl.Depth(4, 4)
    assert fixed_depth(cfg(mean_recurrence=3, backprop_depth=5)) == sl.Depth(0, 3)


@pytest.mark.parametrize("n, k", [(0, 0), (-1, 2), (torch.tensor([1, 0]), torch.tensor([0, 0]))])
def test_a_depth_without_iterations_is_refused(n, k):
    with pytest.raises(ValueError, match="depth"):
        sl.Depth(n, k)


def test_int_depth_means_total_with_the_last_mu_bwd_carrying_gradient():
    assert sl.Depth.of(10, 4) == sl.Depth(6, 4)
    assert sl.Depth.of(2, 4) == sl.Depth(0, 2)
    with pytest.raises(TypeError):
        sl.Depth.of(2.5, 1)
