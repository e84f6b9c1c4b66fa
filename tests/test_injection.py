"""The injection family: spectral radius by construction, and the linearised loop's known answers."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stabilitylab import LoopedLM, ModelConfig
from stabilitylab.model.injection import INJECTIONS, STABLE_BY_CONSTRUCTION, make_injection


def rho(A: torch.Tensor) -> float:
    A = A.detach().double()
    return float(A.abs().max() if A.ndim == 1 else torch.linalg.eigvals(A).abs().max())


def cfg_for(injection: str, **kw) -> ModelConfig:
    return ModelConfig(injection=injection, **{**dict(d_model=16, n_heads=2, vocab_size=32, block_size=16), **kw})


extreme = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False)


@pytest.mark.parametrize("name", ["parcae", "parcae-zoh"])
@given(a_log=st.lists(extreme, min_size=4, max_size=4), dt_bias=st.lists(extreme, min_size=4, max_size=4))
def test_parcae_transition_is_strictly_inside_the_unit_circle_in_exact_arithmetic(name, a_log, dt_bias):
    inj = make_injection(cfg_for(name, d_state=4)).double()
    with torch.no_grad():
        inj.A_log.copy_(torch.tensor(a_log))
        inj.dt_bias.copy_(torch.tensor(dt_bias))
    # log Ā = −Δ·a is exactly representable in float64 over this range and strictly negative,
    # so ρ(Ā) = exp(max log Ā) < 1 exactly, even where exp() itself rounds to 1.0.
    assert (inj.log_transition() < 0).all()
    assert rho(inj.transition()) <= 1.0


@pytest.mark.parametrize("dtype, delta_a", [(torch.float32, 1e-8), (torch.bfloat16, 1e-3)])
def test_low_precision_saturation_of_exp_to_one_is_visible_not_hidden(dtype, delta_a):
    """exp(−Δa) rounds to exactly 1.0 for Δa ≲ 6e-8 (float32) or ≲ 4e-3 (bfloat16):
    the transition then reports ρ = 1, while log_transition keeps the true margin."""
    inj = make_injection(cfg_for("parcae", d_state=4))
    with torch.no_grad():
        inj.dt_bias.fill_(math.log(math.expm1(1.0)))  # Δ = softplus(dt_bias) = 1
        inj.A_log.fill_(math.log(delta_a))  # a = delta_a
    inj = inj.to(dtype)
    assert (inj.transition() == 1.0).all(), "saturation must show up as ρ = 1 in the model's dtype"
    assert rho(inj.transition()) == 1.0
    assert (inj.double().log_transition() < 0).all()


@pytest.mark.parametrize("name, ratio", [("add", 1.0), ("parcae", math.sqrt(1 / 5))])
def test_with_identity_blocks_the_loop_is_the_linear_system_add_marginal_parcae_contracting(name, ratio):
    """With zero-initialised out-projections every core block is the identity, so R̄ = 0 and
    F(h) = Āh + B̄e: successive increments h_{t+1} − h_t = Ā(h_t − h_{t−1}) shrink by ρ(Ā)
    per step. For add (Ā = I) they neither grow nor decay: ‖h_t‖ grows linearly, the marginal
    case; for parcae they decay geometrically at the init decay √(1/5)."""
    model = LoopedLM(cfg_for(name, zero_init_out=True, init_state="seeded"))
    e = model.encode(torch.randint(0, 32, (2, 8)))
    F, h = model.loop_map(e), model.initial_state(e)
    steps = [h]
    for _ in range(6):
        steps.append(F(steps[-1]))
    deltas = torch.stack([(b - a).norm() for a, b in zip(steps, steps[1:])]).detach()
    assert (deltas[1:] / deltas[:-1]).tolist() == pytest.approx([ratio] * 5, rel=1e-5)
    assert rho(model.injection.transition()) == pytest.approx(ratio, rel=1e-6)


@pytest.mark.parametrize("name", ["free-diagonal", "concat"])
def test_unconstrained_injections_can_exceed_one(name):
    inj = make_injection(cfg_for(name))
    with torch.no_grad():
        if name == "free-diagonal":
            inj.a.fill_(1.5)
        else:
            inj.W[:, :16] = 2.0 * torch.eye(16)
    assert rho(inj.transition()) == pytest.approx(1.5 if name == "free-diagonal" else 2.0)


@given(scale=st.floats(0.0, 20.0), skew=st.floats(0.0, 20.0), a_log=extreme, dt_bias=extreme, seed=st.integers(0, 99))
def test_stable_dense_norm_is_below_its_dissipation_bound(scale, skew, a_log, dt_bias, seed):
    """‖Ā‖₂ ≤ exp(−minᵢ Δᵢ aᵢ) < 1 for any L, S: the docstring's bound, checked in float64."""
    inj = make_injection(cfg_for("stable-dense", d_state=8)).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        inj.L.copy_(scale * torch.randn(8, 8, generator=g, dtype=torch.float64))
        inj.S.copy_(skew * torch.randn(8, 8, generator=g, dtype=torch.float64))
        inj.A_log.add_(torch.linspace(-1, 1, 8, dtype=torch.float64) + a_log / 10)
        inj.dt_bias.add_(dt_bias / 10)
    with torch.no_grad():
        A = inj.transition()
        dt, a = torch.nn.functional.softplus(inj.dt_bias), torch.exp(inj.A_log)
    bound = math.exp(-float((dt * a).min()))
    assert float(torch.linalg.matrix_norm(A, ord=2)) <= bound * (1 + 1e-9)
    assert rho(A) < 1.0 or bound == 1.0  # bound == 1.0 only when float64 itself saturates


def test_stable_dense_mixes_channels():
    inj = make_injection(cfg_for("stable-dense"))
    with torch.no_grad():
        inj.S.normal_()
    A = inj.transition()
    off_diagonal = A - torch.diag(torch.diagonal(A))
    assert off_diagonal.abs().max() > 1e-2


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_forward_is_transition_times_state_plus_input_matrix_times_input(name):
    """Every injection is exactly h ↦ Ā h + B̄ e, with Ā, B̄ from its own accessors."""
    cfg = cfg_for(name, d_state=16 if name == "add" else 12)
    inj = make_injection(cfg).double()
    h, e = torch.randn(3, 5, cfg.state_dim, dtype=torch.float64), torch.randn(3, 5, 16, dtype=torch.float64)
    A, B = inj.transition(), inj.input_matrix()
    linear = (h * A if A.ndim == 1 else h @ A.T) + e @ B.T
    torch.testing.assert_close(inj(h, e), linear)


def _linear_loop_model(name: str) -> LoopedLM:
    """A model whose core is the identity (zero-initialised out-projections), so the
    loop map is exactly the linear injection h ↦ Ā h + B̄ e (R̄ = 0)."""
    torch.manual_seed(0)
    return LoopedLM(cfg_for(name, init_state="zero")).double().eval()


@pytest.mark.parametrize("name", sorted(STABLE_BY_CONSTRUCTION))
def test_linearised_stable_loop_converges_to_its_fixed_point(name):
    model = _linear_loop_model(name)
    tokens = torch.randint(0, 32, (2, 8))
    e = model.encode(tokens)
    A, B = model.injection.transition(), model.injection.input_matrix()
    A = torch.diag(A) if A.ndim == 1 else A
    fixed_point = torch.linalg.solve(torch.eye(A.shape[0], dtype=A.dtype) - A, (e @ B.T).unsqueeze(-1)).squeeze(-1)
    F = model.loop_map(e, tokens)
    h = model.initial_state(e)
    with torch.no_grad():
        for _ in range(200):
            h = F(h)
    torch.testing.assert_close(h, fixed_point, atol=1e-10, rtol=1e-10)


def test_linearised_loop_grows_geometrically_when_rho_exceeds_one():
    model = _linear_loop_model("free-diagonal")
    with torch.no_grad():
        model.injection.a.fill_(1.2)
    tokens = torch.randint(0, 32, (1, 8))
    e = model.encode(tokens)
    F = model.loop_map(e, tokens)
    h, norms = model.initial_state(e), []
    with torch.no_grad():
        for _ in range(60):
            h = F(h)
            norms.append(float(h.norm()))
    # from h_0 = 0 with Ā = 1.2·I: h_t = (1.2^t − 1) / 0.2 · B̄e exactly
    drive = float(model.injection.drive(e).detach().norm())
    expected = [(1.2 ** t - 1) / 0.2 * drive for t in range(1, 61)]
    assert norms == pytest.approx(expected, rel=1e-9)
    assert norms[-1] > 1e4 * norms[0]
