"""Lyapunov exponents: known answers on textbook maps and on the Parcae loop, and clear errors."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stabilitylab as sl
from stabilitylab.analysis import finite_time_lyapunov, loop_lyapunov, lyapunov_spectrum

# Hénon map, a = 1.4, b = 0.3 (Sprott, Chaos and Time-Series Analysis, 2003, Table A.1)
HENON_A, HENON_B = 1.4, 0.3
HENON_EXPONENTS = (0.41922, -1.62319)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny problems, one torch thread


def henon(x):
    """(x, y) ↦ (1 − a x² + y, b x) on the last axis; det J = −b everywhere."""
    x0, x1 = x.unbind(-1)
    return torch.stack([1 - HENON_A * x0.square() + x1, HENON_B * x0], dim=-1)


def on_the_attractor(h, steps=100):
    for _ in range(steps):
        h = henon(h)
    return h


@pytest.fixture(scope="module")
def henon_orbit():
    h0 = on_the_attractor(torch.tensor([0.1, 0.1], dtype=torch.float64))
    return h0, lyapunov_spectrum(henon, h0, steps=500, burn_in=20)


def henon_ensemble(M, steps, seed=1):
    """M independent Hénon orbits are one map on R^2M with spectrum {λ₁ ×M, λ₂ ×M}: the mean
    of the top M exponents estimates λ₁ from M·steps iterations. Its standard deviation is
    σ ≈ 5.9e-3·√(4000/steps)/√M (the spread of single-orbit estimates, measured over 40 000
    orbits; 40 seeds of this function at M = 32, steps = 600 gave 2.5e-3 and a mean 0.4197)."""
    h0 = on_the_attractor(0.1 * torch.rand(M, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    exponents = lyapunov_spectrum(henon, h0, steps=steps, burn_in=20).exponents
    return exponents[:M].mean(), exponents[M:].mean(), exponents.sum()


# ---- linear maps ----------------------------------------------------------------------------------

@settings(max_examples=5, deadline=None)
@given(st.floats(0.05, 0.5), st.lists(st.floats(1.5, 3.0), max_size=3), st.data())
def test_a_diagonal_linear_map_has_exponents_log_abs_entries(base, ratios, data):
    """Moduli at least 1.5× apart, so 50 burn-in steps align the frame to 1.5⁻⁵⁰ ≈ 1e-9."""
    moduli = base * np.cumprod([1.0, *ratios])
    signs = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=len(moduli), max_size=len(moduli)))
    order = data.draw(st.permutations(range(len(moduli))))
    a = torch.tensor([signs[i] * moduli[i] for i in order], dtype=torch.float64)
    result = lyapunov_spectrum(lambda h: a * h, torch.ones(len(a), dtype=torch.float64), steps=5, burn_in=50)
    np.testing.assert_allclose(result.exponents, np.log(moduli)[::-1], rtol=0, atol=1e-6)


def test_a_random_dense_linear_map_has_exponents_log_abs_eigenvalues():
    """Complex eigenvalues come in pairs of equal modulus; each member's estimate then
    oscillates, with an error that decays like 1/steps."""
    A = np.random.default_rng(0).normal(size=(5, 5))
    A *= 0.99 / np.abs(np.linalg.eigvals(A)).max()  # keep the orbit finite
    lam = np.linalg.eigvals(A)
    assert np.iscomplex(lam).sum() >= 2
    At = torch.from_numpy(A)
    result = lyapunov_spectrum(lambda h: At @ h, torch.ones(5, dtype=torch.float64), steps=3000, burn_in=100)
    expected = np.sort(np.log(np.abs(lam)))[::-1]
    np.testing.assert_allclose(result.exponents, expected, rtol=0, atol=1e-4)
    assert result.exponents.sum() == pytest.approx(np.log(abs(np.linalg.det(A))), abs=1e-10)


def test_the_leading_k_exponents_are_the_leading_part_of_the_spectrum():
    a = torch.tensor([0.9, -0.5, 0.3, 0.1], dtype=torch.float64)
    result = lyapunov_spectrum(lambda h: a * h, torch.ones(4, dtype=torch.float64), steps=10, burn_in=100, k=2)
    np.testing.assert_allclose(result.exponents, np.log([0.9, 0.5]), atol=1e-9)
    assert result.running.shape == (10, 2) and result.conditioning.shape == (10,)


def test_a_bfloat16_map_gets_exponents_to_its_precision():
    """Tangents are rounded to bfloat16 for every JVP (QR runs in float32): ~1e-2 accuracy."""
    a = torch.tensor([0.9, -0.25], dtype=torch.bfloat16)
    result = lyapunov_spectrum(lambda h: a * h, torch.ones(2, dtype=torch.bfloat16), steps=50, burn_in=20)
    np.testing.assert_allclose(result.exponents, np.log([0.9, 0.25]), atol=2e-2)


def test_running_estimates_end_at_the_exponents_and_to_dict_is_plain_json():
    a = torch.tensor([0.8, 0.2], dtype=torch.float64)
    result = lyapunov_spectrum(lambda h: a * h, torch.ones(2, dtype=torch.float64), steps=5)
    np.testing.assert_array_equal(result.running[-1], result.exponents)
    assert np.all(result.conditioning >= 1.0)
    assert json.loads(json.dumps(result.to_dict()))["exponents"] == result.exponents.tolist()


# ---- a chaotic map: Hénon ------------------------------------------------------------------------------

def test_henon_exponents_match_the_published_values():
    """M = 64 orbits of 500 steps: σ ≈ 2.1e-3; the tolerance is 4σ."""
    lambda1, lambda2, total = henon_ensemble(M=64, steps=500)
    assert lambda1 == pytest.approx(HENON_EXPONENTS[0], abs=8e-3)
    assert lambda2 == pytest.approx(HENON_EXPONENTS[1], abs=8e-3)
    assert total == pytest.approx(64 * math.log(HENON_B), abs=1e-9)


@pytest.mark.slow
def test_a_long_henon_ensemble_pins_the_published_exponents_to_2e_3():
    """M = 128 orbits of 4000 steps: σ ≈ 5.2e-4; the tolerance is 4σ."""
    lambda1, lambda2, _ = henon_ensemble(M=128, steps=4000)
    assert lambda1 == pytest.approx(HENON_EXPONENTS[0], abs=2e-3)
    assert lambda2 == pytest.approx(HENON_EXPONENTS[1], abs=2e-3)


def test_henon_exponents_sum_to_log_b(henon_orbit):
    """Dissipation: Σλᵢ = mean log|det J| along the orbit, and det J = −b for Hénon."""
    _, result = henon_orbit
    assert result.exponents.sum() == pytest.approx(math.log(HENON_B), abs=1e-9)
    assert result.exponents[0] > 0  # chaotic


def test_twin_trajectories_agree_with_the_qr_method_on_henon(henon_orbit):
    """Same seed: the twin's perturbation starts along the QR method's first tangent vector."""
    h0, result = henon_orbit
    twin = finite_time_lyapunov(henon, h0, steps=500, burn_in=20)
    assert twin.exponent == pytest.approx(result.exponents[0], abs=1e-5)
    assert twin.running.shape == (500,)
    assert json.loads(json.dumps(twin.to_dict()))["exponent"] == twin.exponent


def test_exponents_sum_to_the_mean_log_det_along_a_nonlinear_orbit():
    """For a map whose det J varies along the orbit (a contracting tanh network)."""
    n = 6
    g = torch.Generator().manual_seed(0)
    W = 1.2 * torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    b = torch.randn(n, generator=g, dtype=torch.float64)

    def f(h):
        return torch.tanh(W @ h + b)

    h = torch.randn(n, generator=g, dtype=torch.float64)
    result = lyapunov_spectrum(f, h, steps=60)
    logdets = []
    for _ in range(60):
        logdets.append(torch.linalg.slogdet(torch.func.jacfwd(f)(h))[1].item())
        h = f(h)
    assert np.std(logdets) > 0.01  # det J does vary
    assert result.exponents.sum() == pytest.approx(np.mean(logdets), abs=1e-6)


# ---- the Parcae loop -------------------------------------------------------------------------------------

def tiny_model(**overrides):
    torch.manual_seed(0)
    return sl.LoopedLM(sl.ModelConfig.preset("tiny", init_state="seeded", **overrides)).double()


@pytest.mark.parametrize("position", [None, 1])
def test_a_parcae_model_at_init_has_exponents_log_decay(position):
    """Every core block is the identity at init, so F(h) = Ā h + B̄e and λᵢ = log 0.4472."""
    model = tiny_model()
    tokens = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    result = loop_lyapunov(model, tokens, depth=6, k=4, position=position)
    decay = model.injection.transition().detach()
    np.testing.assert_allclose(result.exponents, np.log(decay[:4].numpy()), rtol=0, atol=1e-12)
    assert decay[0].item() == pytest.approx(math.sqrt(1 / 5), rel=1e-6)


@pytest.mark.parametrize("position", [None, 2])
def test_a_parcae_model_with_spread_decays_has_exponents_log_of_its_largest_decays(position):
    """Decays 0.9·0.8^j: per token the k leading exponents are log 0.9, log 0.72, ...; over the
    whole sequence each decay is shared by all T = 3 positions, so each repeats three times."""
    model = tiny_model()
    decays = 0.9 * 0.8 ** torch.arange(32, dtype=torch.float64)
    with torch.no_grad():  # Ā = exp(−Δ·exp(A_log)), so A_log = log(−log Ā / Δ)
        dt = torch.nn.functional.softplus(model.injection.dt_bias)
        model.injection.A_log.copy_(torch.log(-torch.log(decays) / dt))
    tokens = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(0))
    result = loop_lyapunov(model, tokens, depth=100, k=6, burn_in=90, position=position)
    leading = np.log(decays.numpy())
    expected = leading[:6] if position is not None else np.repeat(leading[:2], 3)
    np.testing.assert_allclose(result.exponents, expected, rtol=0, atol=1e-6)


def test_loop_lyapunov_refuses_a_burn_in_as_long_as_the_depth():
    model, tokens = tiny_model(), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="burn_in < depth"):
        loop_lyapunov(model, tokens, depth=3, burn_in=3)
    with pytest.raises(ValueError, match="outside a sequence"):
        loop_lyapunov(model, tokens, depth=3, position=7)


# ---- errors ------------------------------------------------------------------------------------------------

def test_a_map_that_changes_the_shape_is_refused():
    with pytest.raises(ValueError, match="must return a state like its input"):
        lyapunov_spectrum(lambda h: h.repeat(2), torch.ones(3), steps=5)
    with pytest.raises(ValueError, match="must return a state like its input"):
        finite_time_lyapunov(lambda h: h.double(), torch.ones(3), steps=5)


def test_an_orbit_that_overflows_is_reported_with_its_step():
    """h ↦ h² from 1e80: 1e160 after one step, inf after two."""
    h0 = torch.full((2,), 1e80, dtype=torch.float64)
    with pytest.raises(ValueError, match="left the finite numbers at step 2"):
        lyapunov_spectrum(torch.square, h0, steps=10)
    with pytest.raises(ValueError, match="failed at step 2"):
        finite_time_lyapunov(torch.square, h0, steps=10)


def test_twins_that_merge_are_reported():
    """A constant map sends both twins to the same point: separation 0, exponent −∞."""
    with pytest.raises(ValueError, match="merged"):
        finite_time_lyapunov(lambda h: torch.zeros_like(h) + 0.5, torch.ones(2, dtype=torch.float64), steps=4)


def test_bad_counts_are_refused():
    f, h = (lambda x: 0.5 * x), torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="steps"):
        lyapunov_spectrum(f, h, steps=0)
    with pytest.raises(ValueError, match="burn_in"):
        finite_time_lyapunov(f, h, steps=3, burn_in=-1)
    with pytest.raises(ValueError, match="1 ≤ k ≤ 3"):
        lyapunov_spectrum(f, h, steps=3, k=4)
