"""The probes' cheaper paths give the numbers of the expensive ones: the trace without the
coda and head, the last-position map with cached keys and values, the per-sequence dense
Jacobian (and its Krylov fallback), the Lyapunov exponents, device norms."""

import numpy as np
import pytest
import torch
from torch.func import jvp

import stabilitylab as sl
from stabilitylab.analysis import loop_jacobian, loop_lyapunov
from stabilitylab.analysis.maps import at_position, loop_state, math_attention
from stabilitylab.train import probes
from stabilitylab.train.probes import (injection_spectrum, last_position_eigenvalues, last_position_lyapunov,
                                       last_position_map, loop_trace)


def perturbed_model(**kw) -> sl.LoopedLM:
    """A tiny model moved off its init (so that the core blocks are not the identity)."""
    torch.manual_seed(0)
    model = sl.LoopedLM(sl.ModelConfig(vocab_size=32, block_size=16, d_model=16, n_heads=2, **kw))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return model.eval()


@pytest.fixture
def probe_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 32, (3, 12), generator=g), g


def test_the_trace_probe_is_the_forwards_trace_bit_for_bit(probe_batch, one_thread):
    model = perturbed_model(value_embed_layers=(1,))
    tokens, g = probe_batch
    h0 = model.draw_state((3, 12), "cpu", torch.float32, g)
    with torch.no_grad():
        full = model(tokens, depth=6, h0=h0, trace=True).trace.to_dict()
        assert loop_trace(model, tokens, 6, h0).to_dict() == full


def orbit(model, tokens, g, depth=5):
    h0 = model.draw_state(tuple(tokens.shape), "cpu", torch.float32, g)
    with torch.no_grad(), math_attention():
        _, h = loop_state(model, tokens, depth, h0)
        loop = last_position_map(model, tokens)
    return h0, h, loop


@pytest.mark.parametrize("options", [dict(injection="parcae", value_embed_layers=(1,)),
                                     dict(injection="concat", norm_position="post"),
                                     dict(injection="stable-dense", n_kv_heads=1, n_core=2)])
def test_the_last_position_map_is_the_loop_map_at_the_last_position(probe_batch, one_thread, options):
    """Value and JVP of the incremental map (cached keys and values) against F with the last
    position replaced (stabilitylab.analysis.maps.at_position)."""
    model = perturbed_model(**options)
    tokens, g = probe_batch
    _, h, loop = orbit(model, tokens, g)
    with math_attention():
        F = model.loop_map(model.encode(tokens), tokens)
        slow, x = at_position(F, h, -1)
        full, fast = loop(h)
        torch.testing.assert_close(full, F(h), rtol=1e-6, atol=1e-6)
        v = torch.randn(x.shape, generator=g)
        for f in (slow, fast):
            torch.testing.assert_close(f(x), slow(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(jvp(fast, (x,), (v,))[1], jvp(slow, (x,), (v,))[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("injection", ["parcae", "concat"])
def test_the_per_sequence_dense_jacobian_is_the_whole_dense_one(probe_batch, one_thread, injection):
    model = perturbed_model(injection=injection)
    tokens, g = probe_batch
    h0, h, loop = orbit(model, tokens, g)
    with math_attention():
        ours = last_position_eigenvalues(loop(h)[1], h[:, -1], k=8)
    dense = loop_jacobian(model, tokens, 5, position=-1, h0=h0, k=8, method="dense").eigenvalues
    np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=1e-6)


def test_above_the_dense_size_the_probe_goes_krylov(probe_batch, one_thread, monkeypatch):
    model = perturbed_model()
    tokens, g = probe_batch
    _, h, loop = orbit(model, tokens, g)
    with math_attention():
        dense = last_position_eigenvalues(loop(h)[1], h[:, -1], k=4)
        monkeypatch.setattr(probes, "DENSE_MAX_BLOCK", 8)  # d_state 16 > 8
        krylov = last_position_eigenvalues(loop(h)[1], h[:, -1], k=4)
    np.testing.assert_allclose(np.abs(krylov), np.abs(dense), rtol=1e-4)


@pytest.mark.parametrize("injection", ["parcae", "concat"])
def test_the_last_position_lyapunov_exponents_are_loop_lyapunovs(probe_batch, one_thread, injection):
    model = perturbed_model(injection=injection)
    tokens, g = probe_batch
    h0, h, loop = orbit(model, tokens, g, depth=6)
    with torch.no_grad(), math_attention():
        ours, h_end = last_position_lyapunov(loop, h0, 6, k=5)
    theirs = loop_lyapunov(model, tokens, 6, k=5, position=-1, h0=h0).exponents
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_end, h, rtol=1e-5, atol=1e-6)


def test_the_spectrum_norms_on_the_device_match_float64(one_thread):
    model = perturbed_model(injection="concat", d_state=24, n_state_heads=3)
    s = injection_spectrum(model)
    B = model.injection.input_matrix().detach().double()
    C = model.readout.weight.detach().double()
    assert s.norm_b == pytest.approx(float(torch.linalg.matrix_norm(B, 2)), rel=1e-5)
    assert s.norm_c == pytest.approx(float(torch.linalg.matrix_norm(C, 2)), rel=1e-5)
