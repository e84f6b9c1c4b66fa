"""The every-step estimates: the warm-started radius tracker against the dense radius (known
linear maps, frozen small models), and the loop trace's contraction rate."""

import math

import numpy as np
import pytest
import torch

import stabilitylab as sl
from stabilitylab.analysis import loop_jacobian
from stabilitylab.analysis.estimate import RadiusTracker, causal_prefix, probe_view, trace_rate
from stabilitylab.analysis.maps import loop_state

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20  # the budget: ≤ 1% after ≤ 20 steps of ≤ 2 JVPs


def tracked(f, h, steps=STEPS, **kw):
    tracker = RadiusTracker(**kw)
    return tracker, [tracker.update(f, h) for _ in range(steps)]


def linear(A):
    return lambda h: A @ h


def with_spectrum(eigs, n, seed=0):
    """A dense non-normal real matrix S D S⁻¹ with the given eigenvalues (a complex λ adds λ̄)
    and the rest drawn in a disk of radius 0.5."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for lam in eigs:
        if isinstance(lam, complex):
            r, phi = abs(lam), math.atan2(lam.imag, lam.real)
            blocks.append(r * torch.tensor([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]],
                                           dtype=torch.float64))
        else:
            blocks.append(torch.tensor([[lam]], dtype=torch.float64))
    size = sum(b.shape[0] for b in blocks)
    rest = 0.5 * torch.rand(n - size, generator=g, dtype=torch.float64) * torch.sign(torch.randn(n - size, generator=g))
    D = torch.block_diag(*blocks, torch.diag(rest))
    S = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    return S @ D @ torch.linalg.inv(S)


@pytest.mark.parametrize("eigs, radius", [
    ([0.95, 0.9, -0.85], 0.95),  # real, close moduli
    ([0.8j + 0.5, 0.7], math.hypot(0.5, 0.8)),  # a conjugate pair on top: power iteration would oscillate
    ([-1.3, 1.25, 0.6], 1.3),  # expanding, opposite signs
])
def test_the_tracker_finds_the_radius_of_a_known_linear_map_within_1_percent_in_20_steps(eigs, radius):
    A = with_spectrum(eigs, 40)
    h = torch.randn(40, dtype=torch.float64)
    tracker, estimates = tracked(linear(A), h)
    assert estimates[-1].radius == pytest.approx(radius, rel=0.01)
    assert tracker.jvps <= 2 * STEPS


def test_the_tracker_on_a_float32_diagonal_map_is_exact_to_float32():
    a = torch.linspace(-0.2, 0.9, 30)
    _, estimates = tracked(lambda h: a * h, torch.ones(30))
    assert estimates[-1].radius == pytest.approx(0.9, rel=1e-5)


def frozen_model(injection):
    torch.manual_seed(0)
    model = sl.LoopedLM(sl.ModelConfig.preset("tiny", init_state="seeded", zero_init_out=False,
                                              injection=injection)).double()
    if injection == "parcae":
        with torch.no_grad():
            model.injection.A_log.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("injection", ["parcae", "concat", "stable-dense"])
@pytest.mark.parametrize("rows", [1, 2])
def test_on_a_frozen_model_the_tracker_converges_to_the_dense_radius(injection, rows):
    model = frozen_model(injection)
    tokens = torch.randint(0, 64, (rows, 16), generator=torch.Generator().manual_seed(0))
    dense = loop_jacobian(model, tokens, depth=3, position=-1, k=4, method="dense")
    F, h = loop_state(model, tokens, 3)
    _, estimates = tracked(*probe_view(F, h, -1))
    assert estimates[-1].radius == pytest.approx(dense.radius, rel=0.01)


def test_the_causal_prefix_has_the_same_block_as_the_whole_sequence():
    model = frozen_model("concat")
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    F, h = loop_state(model, tokens, 3)
    short_tokens, short_h, p = causal_prefix(tokens, h, 9, rows=1)
    assert short_tokens.shape == (1, 10) and short_h.shape == (1, 10, 32)
    F_short = model.loop_map(model.encode(short_tokens), short_tokens)
    whole = loop_jacobian(model, tokens[:1], depth=3, position=9, k=1, method="dense", h0=None)
    g, x = probe_view(F_short, short_h, p)
    _, estimates = tracked(g, x)
    assert estimates[-1].radius == pytest.approx(whole.radius, rel=0.01)


@pytest.mark.parametrize("before", [16, 20, 23])
def test_a_warm_tracker_follows_a_changed_map_by_its_next_restart(before):
    """Images of one cycle may be stale: the estimate lags a changed J by at most one cycle
    (memory / block steps), then starts from fresh images of a converged subspace, where a
    cold tracker needs several steps to converge again."""
    A = with_spectrum([0.9, 0.8j + 0.3, 0.7], 40)
    h = torch.randn(40, dtype=torch.float64)
    warm, _ = tracked(linear(A), h, steps=before)
    B = 1.05 * A  # the next steps' map: 5% more expansive, radius 0.945
    cycle = warm.memory // warm.block
    warm_after = [warm.update(linear(B), h).radius for _ in range(cycle + 2)]
    assert all(r == pytest.approx(0.945, rel=1e-3) for r in warm_after[cycle:])
    cold = [e.radius for e in tracked(linear(B), h, steps=3)[1]]
    assert all(abs(r / 0.945 - 1) > 0.01 for r in cold)


def test_a_new_state_shape_restarts_the_tracker():
    tracker = RadiusTracker()
    tracker.update(lambda h: 0.5 * h, torch.ones(10))
    assert tracker.update(lambda h: 0.3 * h, torch.ones(12)).radius == pytest.approx(0.3)


def test_a_non_finite_state_or_image_is_a_value_error_and_resets():
    tracker = RadiusTracker()
    with pytest.raises(ValueError, match="non-finite"):
        tracker.update(lambda h: h, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="non-finite"):
        tracker.update(lambda h: h * torch.tensor([float("inf"), 1.0]), torch.ones(2))
    assert tracker.update(lambda h: 2 * h, torch.ones(2)).radius == pytest.approx(2.0)


def test_bad_tracker_settings_are_refused():
    with pytest.raises(ValueError, match="block"):
        RadiusTracker(block=4, memory=2)


# ---- the loop trace's rate ---------------------------------------------------------------------------

def test_the_trace_rate_of_a_linear_loop_is_its_decay():
    a, b = 0.7, torch.ones(4, dtype=torch.float64)
    h, deltas = torch.zeros(4, dtype=torch.float64), []
    for _ in range(8):
        new = a * h + b
        deltas.append(float((new - h).norm()))
        h = new
    assert trace_rate(deltas) == pytest.approx(a, rel=1e-9)


def test_the_trace_rate_of_a_model_at_init_is_rho_of_a_bar():
    """At init every core block is the identity (zero out-projections): F(h) = Āh + B̄e, and
    the training forward's own trace gives q = ρ(Ā) = injection_decay."""
    torch.manual_seed(0)
    model = sl.LoopedLM(sl.ModelConfig.preset("tiny")).double()
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(tokens, depth=6, trace=True)
    assert trace_rate(out.trace.delta_norm_mean) == pytest.approx(model.cfg.injection_decay, rel=1e-6)


def test_the_trace_rate_of_a_short_stopped_or_overflowed_trace():
    assert math.isnan(trace_rate([1.0]))
    assert math.isnan(trace_rate([1.0, 0.0, 0.0]))
    assert trace_rate([1.0, 2.0, float("inf")]) == math.inf
    assert trace_rate(np.array([1.0, 4.0])) == 4.0
