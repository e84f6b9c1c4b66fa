"""The probes' cheaper paths give the numbers of the expensive ones: the trace without the
coda and head, the per-sequence dense Jacobian (and its Krylov fallback), device norms."""

import numpy as np
import pytest
import torch

import stabilitylab as sl
from stabilitylab.analysis import loop_jacobian
from stabilitylab.analysis.maps import loop_state
from stabilitylab.train import probes
from stabilitylab.train.probes import injection_spectrum, last_position_eigenvalues, loop_trace


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


@pytest.mark.parametrize("injection", ["parcae", "concat"])
def test_the_per_sequence_dense_jacobian_is_the_whole_dense_one(probe_batch, one_thread, injection):
    model = perturbed_model(injection=injection)
    tokens, g = probe_batch
    h0 = model.draw_state((3, 12), "cpu", torch.float32, g)
    ours = last_position_eigenvalues(*loop_state(model, tokens, 5, h0), k=8)
    dense = loop_jacobian(model, tokens, 5, position=-1, h0=h0, k=8, method="dense").eigenvalues
    np.testing.assert_allclose(ours, dense, rtol=1e-6, atol=1e-7)


def test_above_the_dense_size_the_probe_goes_krylov(probe_batch, one_thread, monkeypatch):
    model = perturbed_model()
    tokens, g = probe_batch
    h0 = model.draw_state((3, 12), "cpu", torch.float32, g)
    dense = last_position_eigenvalues(*loop_state(model, tokens, 5, h0), k=4)
    monkeypatch.setattr(probes, "DENSE_MAX_BLOCK", 8)  # d_state 16 > 8
    krylov = last_position_eigenvalues(*loop_state(model, tokens, 5, h0), k=4)
    np.testing.assert_allclose(np.abs(krylov), np.abs(dense), rtol=1e-4)


def test_the_spectrum_norms_on_the_device_match_float64(one_thread):
    model = perturbed_model(injection="concat", d_state=24, n_state_heads=3)
    s = injection_spectrum(model)
    B = model.injection.input_matrix().detach().double()
    C = model.readout.weight.detach().double()
    assert s.norm_b == pytest.approx(float(torch.linalg.matrix_norm(B, 2)), rel=1e-5)
    assert s.norm_c == pytest.approx(float(torch.linalg.matrix_norm(C, 2)), rel=1e-5)
