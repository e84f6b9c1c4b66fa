"""Spectra of Ā and of the loop's Jacobian: known answers, properties, and clear errors."""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import stabilitylab as sl
from stabilitylab.analysis import eigenvalues, jacobian_spectral_radius, loop_jacobian, spectral_norm, spectral_radius
from stabilitylab.analysis.maps import batched_jvp

DECAY = math.sqrt(1 / 5)
finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny problems, one torch thread


def spiked_map(n, seed=0):
    """h ↦ tanh(W h + b), W = 0.5·G/√n + U diag(3, −2.5, 2) Uᵀ: a nonlinear map whose Jacobian
    has three outlying eigenvalues over a disk of radius ≈ 0.5."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64))
    spikes = torch.tensor([3.0, -2.5, 2.0], dtype=torch.float64)
    W = 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n) + (U * spikes) @ U.T
    b = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return lambda h: torch.tanh(W @ h + b)


def tiny_model(**overrides):
    """The tiny preset in float64 with a deterministic initial state."""
    torch.manual_seed(0)
    return sl.LoopedLM(sl.ModelConfig.preset("tiny", init_state="seeded", **overrides)).double()


def perturbed_model():
    """Random out-projections (so the core blocks are not the identity) and random decays."""
    model = tiny_model(zero_init_out=False)
    with torch.no_grad():
        model.injection.A_log.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


def matched(a, b):
    """Greatest distance from an eigenvalue of a to the nearest one of b, both ways."""
    d = np.abs(np.asarray(a)[:, None] - np.asarray(b)[None, :])
    return max(d.min(1).max(), d.min(0).max())


# ---- Ā --------------------------------------------------------------------------------------------

@settings(deadline=None)
@given(arrays(np.float64, st.integers(1, 12), elements=finite))
def test_diagonal_radius_and_norm_are_the_largest_entry_modulus(a):
    assert spectral_radius(a) == spectral_norm(a) == np.abs(a).max()
    assert spectral_radius(torch.from_numpy(a)) == np.abs(a).max()
    np.testing.assert_array_equal(np.abs(eigenvalues(a)), np.sort(np.abs(a))[::-1])


square = arrays(np.float64, st.integers(1, 6).map(lambda d: (d, d)), elements=finite)


@settings(max_examples=40, deadline=None)
@given(square)
def test_dense_radius_is_bounded_by_the_norm_the_trace_and_the_determinant(A):
    """|tr A|/d ≤ ρ(A) ≤ ‖A‖₂ and |det A| ≤ ρ(A)^d, since tr = Σλᵢ and det = Πλᵢ."""
    rho, norm, d = spectral_radius(A), spectral_norm(A), len(A)
    slack = 1e-9 * max(1.0, np.abs(A).max())
    assert norm == pytest.approx(np.linalg.norm(A, 2), abs=slack)
    assert abs(np.trace(A)) / d - slack <= rho <= norm + slack
    assert abs(np.linalg.det(A)) <= (rho + slack) ** d * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(square)
def test_a_symmetric_matrix_has_radius_equal_to_its_norm(A):
    """A normal matrix has ρ = ‖·‖₂; a symmetric one is normal."""
    S = A + A.T
    assert spectral_radius(S) == pytest.approx(spectral_norm(S), abs=1e-9 * max(1.0, np.abs(S).max()))


def test_dense_radius_matches_numpy_on_random_matrices():
    rng = np.random.default_rng(0)
    for d in (1, 2, 5, 17):
        A = rng.normal(size=(d, d))
        assert spectral_radius(A) == pytest.approx(np.abs(np.linalg.eigvals(A)).max(), rel=1e-12)
        np.testing.assert_allclose(np.abs(eigenvalues(A)), np.sort(np.abs(np.linalg.eigvals(A)))[::-1], rtol=1e-12)


def test_a_badly_scaled_matrix_still_has_its_eigenvalues():
    """MKL's geev fails on this one (found by hypothesis); the cube roots of 6.3e-245² are exact."""
    A = np.array([[0.0, 0.0, 6.33817911e-245], [6.33817911e-245, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert spectral_radius(A) == pytest.approx(6.33817911e-245 ** (2 / 3), rel=1e-9)


def test_dense_radius_and_norm_differ_for_a_non_normal_matrix():
    A = np.array([[0.5, 100.0], [0.0, 0.5]])
    assert spectral_radius(A) == pytest.approx(0.5)
    assert spectral_norm(A) == pytest.approx(100.0025, rel=1e-5)


def test_eigenvalues_of_a_rotation_come_as_a_conjugate_pair_by_modulus():
    c, s = math.cos(0.3), math.sin(0.3)
    A = torch.tensor([[0.9 * c, -0.9 * s, 0.0], [0.9 * s, 0.9 * c, 0.0], [0.0, 0.0, -0.5]])
    lam = eigenvalues(A)
    assert isinstance(lam, torch.Tensor) and lam.dtype == torch.complex128
    expected = torch.tensor([0.9 * complex(c, s), 0.9 * complex(c, -s), -0.5], dtype=torch.complex128)
    torch.testing.assert_close(lam, expected, atol=1e-7, rtol=0)
    assert spectral_radius(A) == pytest.approx(0.9, abs=1e-7)


def test_eigenvalues_come_back_in_the_input_library():
    assert isinstance(eigenvalues(np.array([0.5, -0.7])), np.ndarray)
    assert isinstance(eigenvalues(torch.tensor([0.5, -0.7])), torch.Tensor)
    np.testing.assert_array_equal(eigenvalues(np.array([0.5, -0.7])), [-0.7, 0.5])


def test_rounding_to_the_model_dtype_reports_a_decay_of_exactly_one():
    """exp(−Δa) is < 1 in float64 but rounds to 1.0 in float32 (Δa ≲ 6e-8) and bfloat16 (≲ 4e-3)."""
    tiny = np.exp(-np.array([1e-9, 0.5]))
    assert spectral_radius(tiny) < 1.0
    assert spectral_radius(tiny, dtype="float32") == 1.0
    assert spectral_radius(torch.from_numpy(tiny), dtype=torch.float32) == 1.0
    small = np.exp(-np.array([1e-3, 0.5]))
    assert spectral_radius(small, dtype=np.float32) < 1.0
    assert spectral_radius(small, dtype=torch.bfloat16) == 1.0
    assert spectral_norm(small, dtype="bfloat16") == 1.0
    dense = np.diag(small) + 1e-9 * np.ones((2, 2))
    assert spectral_radius(dense) < 1.0 and spectral_radius(dense, dtype="bfloat16") == 1.0


def test_a_parcae_model_transition_has_the_init_decay_as_radius():
    model = tiny_model()
    A = model.injection.transition()  # a parameter-dependent tensor, taken as it is
    assert A.ndim == 1
    assert spectral_radius(A) == pytest.approx(DECAY, rel=1e-6)


def test_a_stable_dense_transition_has_radius_at_most_its_norm_and_below_one():
    A = tiny_model(injection="stable-dense").injection.transition().detach()
    assert A.ndim == 2
    # ρ ≤ ‖·‖₂ holds exactly; the two LAPACK routines may each round by an ulp or so
    assert spectral_radius(A) <= spectral_norm(A) * (1 + 1e-12) and spectral_norm(A) < 1.0
    assert (A - torch.diag(torch.diagonal(A))).abs().max() > 0  # dense: it mixes channels


def test_a_cupy_array_is_computed_on_and_returned_as_cupy(monkeypatch):
    """Without a GPU, a stand-in module checks the dispatch: a cupy array goes through DLPack
    and its eigenvalues come back as a cupy array (the real module is never imported here)."""
    fake = types.ModuleType("cupy")
    fake.ndarray = type("ndarray", (np.ndarray,), {})
    fake.from_dlpack = lambda t: np.from_dlpack(t).view(fake.ndarray)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    A = np.array([[0.0, 2.0], [0.5, 0.0]]).view(fake.ndarray)
    lam = eigenvalues(A)
    assert isinstance(lam, fake.ndarray)
    np.testing.assert_allclose(np.sort(lam.real), [-1.0, 1.0])
    assert spectral_radius(A) == pytest.approx(1.0) and spectral_norm(A) == pytest.approx(2.0)


def test_real_cupy_arrays_when_a_gpu_is_present():
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    A = cupy.asarray([[0.0, 2.0], [0.5, 0.0]])
    assert isinstance(eigenvalues(A), cupy.ndarray)
    assert spectral_radius(A) == pytest.approx(1.0)


@pytest.mark.parametrize("bad, error, words", [
    (np.ones((2, 3)), ValueError, "square"),
    (np.ones((2, 2, 2)), ValueError, "(d,) diagonal"),
    (np.ones(0), ValueError, "non-empty"),
    (np.array([0.5, np.nan]), ValueError, "non-finite"),
    (np.array([True, False]), TypeError, "boolean"),
    ([0.5, 0.9], TypeError, "numpy, torch or cupy"),
])
def test_bad_transitions_are_refused_with_a_clear_error(bad, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        spectral_radius(bad)


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="not a floating dtype"):
        spectral_radius(np.ones(2), dtype="int8")


# ---- the Jacobian ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dense", "krylov", "arnoldi", "power"])
def test_the_jacobian_of_a_linear_map_has_the_matrix_eigenvalues(method):
    A = torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / math.sqrt(30)
    result = jacobian_spectral_radius(lambda h: A @ h, torch.randn(30, dtype=torch.float64), k=4, method=method)
    lam = np.linalg.eigvals(A.numpy())
    lam = lam[np.argsort(-np.abs(lam), kind="stable")]
    assert result.method == method and result.dim == 30
    assert result.radius == pytest.approx(np.abs(lam[0]), rel=1e-9)
    np.testing.assert_allclose(np.abs(result.eigenvalues), np.abs(lam[:4]), rtol=1e-8)


@pytest.mark.parametrize("method", ["auto", "arnoldi", "power"])
def test_matrix_free_and_dense_agree_on_a_nonlinear_map(method):
    n = 600
    f, h = spiked_map(n), 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = jacobian_spectral_radius(f, h, k=3, method="dense")
    free = jacobian_spectral_radius(f, h, k=3, method=method)
    assert free.method == ("krylov" if method == "auto" else method)  # auto: matrix-free above 512
    assert free.jvps < n
    assert free.radius == pytest.approx(dense.radius, rel=1e-4)
    assert matched(free.eigenvalues, dense.eigenvalues) < 1e-4 * dense.radius


def test_the_jacobian_of_a_diagonal_nonlinear_map_is_known():
    """f(h) = a ⊙ sin(h): J = diag(a cos h), eigenvalues a cos h."""
    a = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    h = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    result = jacobian_spectral_radius(lambda x: a * torch.sin(x), h, k=3)
    expected = (a * torch.cos(h)).numpy()
    np.testing.assert_allclose(result.eigenvalues.real, expected[np.argsort(-np.abs(expected))], rtol=1e-12)
    assert json.loads(json.dumps(result.to_dict()))["radius"] == result.radius


def test_krylov_restarts_until_a_clustered_spectrum_converges():
    """tanh(W h + b) with W ~ N(0, 1.5²/n): its Jacobian's eigenvalues fill a disk, so the
    leading moduli are close together and the 64-column basis must restart many times."""
    n = 600
    g = torch.Generator().manual_seed(0)
    W = 1.5 * torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    b = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    h = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dense = jacobian_spectral_radius(lambda x: torch.tanh(W @ x + b), h, k=2, method="dense")
    free = jacobian_spectral_radius(lambda x: torch.tanh(W @ x + b), h, k=2, method="krylov")
    assert free.jvps > 64
    assert free.radius == pytest.approx(dense.radius, rel=1e-6)
    assert matched(free.eigenvalues, dense.eigenvalues) < 1e-6


def test_the_dense_jacobian_is_the_same_built_in_chunks():
    f, h = spiked_map(40), torch.full((40,), 0.1, dtype=torch.float64)
    whole = jacobian_spectral_radius(f, h, k=40, method="dense")
    chunked = jacobian_spectral_radius(f, h, k=40, method="dense", chunk_size=7)
    np.testing.assert_allclose(chunked.eigenvalues, whole.eigenvalues, rtol=0, atol=1e-12)


def test_a_map_that_changes_the_shape_is_refused():
    with pytest.raises(ValueError, match="must return a state like its input"):
        jacobian_spectral_radius(lambda h: h[:2], torch.ones(3))


def test_a_map_with_non_finite_values_is_refused():
    with pytest.raises(ValueError, match="non-finite"):
        jacobian_spectral_radius(lambda h: h / 0, torch.ones(3))


def test_bad_jacobian_arguments_are_refused():
    f, h = (lambda x: 2 * x), torch.ones(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        jacobian_spectral_radius(f, h, method="lanczos")
    with pytest.raises(ValueError, match="1 ≤ k ≤ 5"):
        jacobian_spectral_radius(f, h, k=6)
    with pytest.raises(ValueError, match="k < n − 1"):
        jacobian_spectral_radius(f, h, k=4, method="arnoldi")
    with pytest.raises(TypeError, match="floating"):
        jacobian_spectral_radius(f, torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="float32 or float64"):
        jacobian_spectral_radius(f, torch.ones(600, dtype=torch.bfloat16), method="krylov")


def test_a_bfloat16_map_has_a_dense_jacobian_in_its_own_rounding():
    a = torch.tensor([0.9, -0.3], dtype=torch.bfloat16)
    result = jacobian_spectral_radius(lambda h: a * h, torch.ones(2, dtype=torch.bfloat16), k=2)
    assert result.method == "dense" and result.radius == pytest.approx(0.9, abs=4e-3)


# ---- the loop of a LoopedLM ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dense", "krylov", "arnoldi", "power"])
@pytest.mark.parametrize("position", [None, 2])
def test_a_parcae_model_at_init_has_loop_jacobian_radius_rho_of_a_bar(method, position):
    """Zero-initialised out-projections make every core block the identity, so F(h) = Ā h + B̄e."""
    model = tiny_model()
    tokens = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    result = loop_jacobian(model, tokens, depth=3, position=position, k=4, method=method)
    rho = spectral_radius(model.injection.transition().detach())
    assert result.radius == pytest.approx(rho, rel=1e-12)
    assert rho == pytest.approx(DECAY, rel=1e-6)
    assert result.dim == (4 * 32 if position is None else 32)


@pytest.mark.parametrize("position", [None, -1])
def test_matrix_free_and_dense_agree_on_a_perturbed_model(position):
    model = perturbed_model()
    tokens = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    dense = loop_jacobian(model, tokens, depth=2, position=position, k=4, method="dense")
    assert dense.radius > DECAY * 1.2  # the blocks matter: not the linear loop
    for method in ("krylov", "arnoldi"):
        free = loop_jacobian(model, tokens, depth=2, position=position, k=4, method=method)
        assert free.radius == pytest.approx(dense.radius, rel=1e-4)
        assert matched(free.eigenvalues, dense.eigenvalues) < 1e-4 * dense.radius


def test_the_sequence_spectrum_is_the_union_of_the_per_token_spectra():
    """Causal attention makes ∂F/∂h block lower-triangular in positions, so its eigenvalues
    are exactly those of the diagonal blocks ∂F[p]/∂h[p] taken together."""
    model = perturbed_model()
    tokens = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(0))
    n = 3 * 32
    whole = loop_jacobian(model, tokens, depth=1, k=n, method="dense").eigenvalues
    blocks = np.concatenate([loop_jacobian(model, tokens, depth=1, position=p, k=32, method="dense").eigenvalues
                             for p in range(3)])
    assert matched(whole, blocks) < 1e-8


def test_loop_jacobian_refuses_bad_positions_and_depths():
    model, tokens = tiny_model(), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="outside a sequence of length 4"):
        loop_jacobian(model, tokens, depth=1, position=4)
    with pytest.raises(ValueError, match="depth"):
        loop_jacobian(model, tokens, depth=-1)
    with pytest.raises(ValueError, match="h0 has shape"):
        loop_jacobian(model, tokens, depth=1, h0=torch.zeros(1, 5, 32, dtype=torch.float64))


def test_a_float64_model_has_a_float64_jacobian():
    """model.double() computes RMSNorm and RoPE in float64 too, so its JVPs are linear to
    float64 rounding; float32 islands would make them nonlinear at 1e-7 and stall the solvers."""
    model = perturbed_model()
    tokens = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e = model.encode(tokens)
        F, h = model.loop_map(e, tokens), model.initial_state(e)
    u, v = torch.randn(2, *h.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, (Ju, Jv, Juv) = batched_jvp(F, h, torch.stack([u, v, u + v]))
    torch.testing.assert_close(Juv, Ju + Jv, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_analysis_runs_on_the_device_of_its_inputs():
    from stabilitylab.analysis import finite_time_lyapunov, loop_lyapunov

    model = tiny_model().cuda()
    tokens = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0)).cuda()
    rho = spectral_radius(model.injection.transition())
    for method in ("dense", "krylov", "arnoldi", "power"):
        assert loop_jacobian(model, tokens, depth=2, k=2, method=method).radius == pytest.approx(rho, rel=1e-9)
    exponents = loop_lyapunov(model, tokens, depth=4, k=3).exponents
    np.testing.assert_allclose(exponents, math.log(rho), atol=1e-9)
    h = torch.full((2,), 0.5, dtype=torch.float64, device="cuda")
    assert finite_time_lyapunov(lambda x: 0.5 * x, h, steps=5).exponent == pytest.approx(math.log(0.5))
    assert isinstance(eigenvalues(torch.eye(2, device="cuda")), torch.Tensor)
