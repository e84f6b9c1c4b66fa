"""Spectral-bound checks (stabilitylab.analysis.bounds): known answers on linear loops, the
injections that promise ρ(Ā) < 1 keep it on random weights, the unconstrained ones fail when
pushed, low-precision saturation is caught, and the report formats parse."""

import copy
import functools
import json
import math
import xml.etree.ElementTree as ET

import pytest
import torch

from stabilitylab.analysis.bounds import (Bounds, CheckSettings, check_bounds, depth_loss_bound, exact_log_radius,
                                          input_norm_bound, jacobian_bound, load_bounds, lyapunov_bound,
                                          readout_norm_bound, rho_bound, state_growth_bound)
from stabilitylab.config import ConfigError, ModelConfig
from stabilitylab.model import STABLE_BY_CONSTRUCTION, LoopedLM

pytestmark = pytest.mark.usefixtures("one_thread")

DECAY = math.sqrt(1 / 5)  # every diagonal injection's Ā at init


def tiny(injection: str, **overrides) -> LoopedLM:
    """A fresh tiny model (a copy: building one costs seconds on a loaded 2-core machine)."""
    return copy.deepcopy(_built(injection, tuple(sorted(overrides.items()))))


@functools.cache
def _built(injection: str, overrides: tuple) -> LoopedLM:
    torch.manual_seed(0)
    return LoopedLM(ModelConfig.preset("tiny", injection=injection, **dict(overrides))).eval()


def linear(injection: str) -> LoopedLM:
    """Identity core (zero out-projections at init) and h_0 = 0: the loop is h ← Ā h + B̄ e exactly."""
    return tiny(injection, init_state="zero").double()


def randomize_(model: LoopedLM, seed: int) -> LoopedLM:
    """Every parameter random and far from init: vectors (A_log, dt_bias, norms) uniform in [−3, 3]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=gen) * 6 - 3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def tokens(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length + 1), generator=torch.Generator().manual_seed(1))


def set_diagonal(model: LoopedLM, a: float) -> LoopedLM:
    """Ā = a·I for a free-diagonal or concat model."""
    with torch.no_grad():
        if model.cfg.injection == "free-diagonal":
            model.injection.a.fill_(a)
        else:
            d = model.cfg.state_dim
            model.injection.W[:, :d] = a * torch.eye(d)
    return model


# ---- ρ(Ā) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", sorted(STABLE_BY_CONSTRUCTION))
def test_injections_stable_by_construction_pass_the_rho_bound_on_random_weights(name, seed):
    model = randomize_(tiny(name), seed)
    result = rho_bound(model.injection, margin=0.0, dtype="float32")
    assert result.passed, result.message()
    exact_rho, exact_gap = result.detail["exact ρ"], result.detail["exact 1 − ρ"]
    assert 0 < exact_rho < 1 and exact_gap > 0
    # the same number computed in float32 (for stable-dense through a float32 matrix exponential)
    assert exact_rho == pytest.approx(result.measured, rel=1e-6 if name != "stable-dense" else 1e-4)
    assert exact_gap == pytest.approx(1 - exact_rho, rel=1e-9)


def test_exact_radius_of_stable_dense_is_that_of_its_matrix_exponential():
    model = randomize_(tiny("stable-dense"), 0).double()
    A = torch.linalg.matrix_exp(model.injection.log_transition()).detach()
    assert math.exp(exact_log_radius(model.injection)) == pytest.approx(
        float(torch.linalg.eigvals(A).abs().max()), rel=1e-12)


@pytest.mark.parametrize("name, a", [("free-diagonal", 1.2), ("concat", 1.2)])
def test_unconstrained_injections_fail_the_rho_bound_when_pushed(name, a):
    model = set_diagonal(tiny(name), a)
    result = rho_bound(model.injection, margin=0.0)
    assert not result.passed
    assert result.measured == pytest.approx(a, rel=1e-6) and result.margin == pytest.approx(1 - a, rel=1e-5)
    assert result.message().startswith("rho_margin: ρ(Ā) in float32 = 1.2, allowed < 1 (margin -0.2")
    assert "FAILS" in result.message()
    assert "exact ρ" not in result.detail  # no log_transition: nothing exact to report


def test_the_plain_looped_transformer_is_marginal_and_fails_a_strict_rho_bound():
    result = rho_bound(tiny("add").injection, margin=0.0)
    assert (result.measured, result.passed, result.margin) == (1.0, False, 0.0)


def test_a_margin_tightens_the_rho_bound():
    injection = tiny("parcae").injection  # ρ = 0.4472
    assert rho_bound(injection, margin=0.5).passed
    assert not rho_bound(injection, margin=0.6).passed


@pytest.mark.parametrize("delta_a, fails_in, passes_in", [(1e-3, "bfloat16", "float32"), (1e-8, "float32", None)])
def test_low_precision_saturation_fails_the_rho_bound_while_the_exact_margin_is_reported(delta_a, fails_in,
                                                                                         passes_in):
    """exp(−Δa) is exactly 1.0 in bfloat16 for Δa = 1e-3 (float32 still 0.9990005) and in
    float32 for Δa = 1e-8: ρ rounds to 1, yet in exact arithmetic 1 − ρ = Δa."""
    injection = tiny("parcae").injection
    with torch.no_grad():
        injection.dt_bias.fill_(math.log(math.expm1(1.0)))  # Δ = 1
        injection.A_log.fill_(math.log(delta_a))  # a = Δa
    failed = rho_bound(injection, 0.0, dtype=fails_in)
    assert (failed.measured, failed.passed) == (1.0, False)
    assert failed.detail["exact 1 − ρ"] == pytest.approx(-math.expm1(-delta_a), rel=1e-6)
    assert failed.message().startswith(f"rho_margin: ρ(Ā) in {fails_in} = 1, allowed < 1 (margin 0): FAILS [exact ρ")
    if passes_in:
        passed = rho_bound(injection, 0.0, dtype=passes_in)
        assert passed.passed and passed.measured == pytest.approx(math.exp(-delta_a), rel=1e-7)


# ---- norms --------------------------------------------------------------------------------------------

def test_input_and_readout_norms_have_their_known_values_at_init():
    model = tiny("parcae")  # B̄ = Δ·I with Δ = −log(decay); C is scaled orthogonal with std √(2/(5d)), d = 32
    B = input_norm_bound(model.injection, 0.81)
    assert B.measured == pytest.approx(-math.log(DECAY), rel=1e-6) and B.passed
    assert not input_norm_bound(model.injection, 0.80).passed
    C = readout_norm_bound(model, 1.0)
    assert C.measured == pytest.approx(math.sqrt(2 / 5), rel=1e-6) and C.passed
    assert not readout_norm_bound(model, 0.6).passed


# ---- the loop on a batch: known answers on linear loops -------------------------------------------------

def test_state_growth_of_a_linear_loop_is_the_geometric_sum():
    """From h_0 = 0, h_t = (1 − aᵗ)/(1 − a) · B̄e for a diagonal Ā = a·I, so every token's norm
    grows by (1 − a^T)/(1 − a^μ); for add (a = 1) by T/μ."""
    x = tokens()[:, :-1]
    mu, T = 3, 12
    model = linear("parcae")
    a = float(model.injection.transition().detach()[0])  # √(1/5) up to the float32 dt_bias it was built with
    parcae = state_growth_bound(model, x, None, ceiling=1.5, multiple=4)
    assert parcae.measured == pytest.approx((1 - a ** T) / (1 - a ** mu), rel=1e-6) and parcae.passed  # float32 trace
    add = state_growth_bound(linear("add"), x, None, ceiling=1.5, multiple=4)
    assert add.measured == pytest.approx(T / mu, rel=1e-6) and not add.passed
    assert add.message().startswith("max_state_growth: ‖h_12‖ / ‖h_3‖ = 4, allowed ≤ 1.5 (margin -2.5)")


@pytest.mark.parametrize("name, a", [("parcae", DECAY), ("free-diagonal", 1.2)])
def test_jacobian_radius_and_lyapunov_exponent_of_a_linear_loop_are_rho_and_its_log(name, a):
    model = linear(name)
    if name == "free-diagonal":
        set_diagonal(model, a)
    a = float(model.injection.transition().detach()[0])  # parcae: √(1/5) up to its float32 dt_bias
    x = tokens()[:, :-1]
    h0 = torch.zeros(*x.shape, model.cfg.state_dim, dtype=torch.float64)
    radius = jacobian_bound(model, x, h0, ceiling=1.0, depth=6)
    exponent = lyapunov_bound(model, x, h0, ceiling=0.0, depth=6)
    assert radius.measured == pytest.approx(a, rel=1e-10)
    assert exponent.measured == pytest.approx(math.log(a), rel=1e-10)
    assert radius.passed == exponent.passed == (a < 1)


def test_a_state_that_overflows_fails_the_dynamic_bounds_with_the_reason():
    model = set_diagonal(tiny("free-diagonal"), 1e30)  # h_t ~ 1e30ᵗ: inf in float32 by t = 2
    x = tokens()[:, :-1]
    report = check_bounds(model, Bounds(max_jacobian_radius=1.0, max_lyapunov=0.0, max_state_growth=2.0),
                          tokens=x)
    assert not report.passed and [r.passed for r in report.results] == [False, False, False]
    jacobian = report.result("max_jacobian_radius")
    assert math.isnan(jacobian.measured) and "non-finite" in jacobian.detail["error"]
    assert json.loads(json.dumps(report.to_dict()))["results"][1]["measured"] is None  # NaN → null: valid JSON


def test_depth_loss_increase_is_the_difference_of_the_losses_at_two_depths():
    model = randomize_(tiny("parcae"), 0)
    batch = tokens()
    x, y = batch[:, :-1], batch[:, 1:]
    h0 = model.draw_state(tuple(x.shape), "cpu", torch.float32, torch.Generator().manual_seed(3))
    result = depth_loss_bound(model, x, y, h0, ceiling=0.0)
    with torch.no_grad():
        L3, L6 = (float(model(x, y, depth=d, h0=h0).loss) for d in (3, 6))  # μ_rec = 3; d ≤ μ_bwd... no grad
    assert result.measured == pytest.approx(L6 - L3, abs=1e-6)
    assert result.passed == (L6 - L3 <= 0.0)
    assert depth_loss_bound(model, x, y, h0, ceiling=L6 - L3 + 1e-3).passed
    assert not depth_loss_bound(model, x, y, h0, ceiling=L6 - L3 - 1e-3).passed


# ---- check_bounds and its report ------------------------------------------------------------------------

ALL = Bounds(rho_margin=0.0, max_input_norm=10.0, max_readout_norm=10.0, max_state_growth=1.5,
             max_jacobian_radius=1.0, max_lyapunov=0.0, max_depth_loss_increase=0.1)


def test_check_bounds_measures_every_bound_set_and_only_those():
    batch = tokens()
    report = check_bounds(tiny("parcae"), ALL, tokens=batch[:, :-1], targets=batch[:, 1:], label="fresh parcae")
    assert [r.name for r in report.results] == ALL.names() and report.passed
    only = check_bounds(tiny("parcae"), Bounds(max_readout_norm=1.0))
    assert [r.name for r in only.results] == ["max_readout_norm"]  # no batch needed for a weight bound


def test_check_bounds_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="max_state_growth.*pass tokens="):
        check_bounds(tiny("parcae"), Bounds(max_state_growth=2.0))
    with pytest.raises(ValueError, match="pass targets="):
        check_bounds(tiny("parcae"), Bounds(max_depth_loss_increase=0.0), tokens=tokens())
    with pytest.raises(ConfigError, match="settings.position: 40 is outside a sequence of 17 tokens"):
        check_bounds(tiny("parcae"), Bounds(max_lyapunov=0.0), CheckSettings(position=40), tokens=tokens())
    with pytest.raises(ConfigError, match="GPT baseline"):
        check_bounds(tiny("parcae", looped=False), Bounds(rho_margin=0.0))


def test_the_report_as_table_json_and_junit():
    model = set_diagonal(tiny("free-diagonal"), 1.2)
    report = check_bounds(model, Bounds(rho_margin=0.0, max_readout_norm=10.0), label="pushed")
    table = report.table()
    assert "rho_margin" in table and "FAIL" in table and "1 of 2 bounds fail: rho_margin" in table
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["passed"] is False and doc["results"][0]["relation"] == "<"
    assert doc["results"][0]["measured"] == pytest.approx(1.2) and doc["results"][1]["passed"] is True
    root = ET.fromstring(report.junit())
    cases = root.findall("testsuite/testcase")
    assert [c.get("name") for c in cases] == ["rho_margin", "max_readout_norm"]
    assert root.find("testsuite").get("failures") == "1"
    failure = cases[0].find("failure")
    assert failure.get("message") == "ρ(Ā) in float32 = 1.2, allowed < 1" and cases[1].find("failure") is None


# ---- bounds files ----------------------------------------------------------------------------------------

def write(tmp_path, text):
    path = tmp_path / "bounds.toml"
    path.write_text(text)
    return path


def test_the_example_bounds_file_loads_every_bound():
    from pathlib import Path

    bounds, settings = load_bounds(Path(__file__).resolve().parents[1] / "checks" / "bounds.toml")
    assert bounds.names() == ALL.names() and settings.dtype == "bfloat16"


@pytest.mark.parametrize("text, says", [
    ("[bounds]\nrho_margn = 0.0\n", r"bounds.rho_margn: unknown bound. allowed bounds: rho_margin, max_input_norm"),
    ("[bounds\nrho_margin = 0\n", r"not valid TOML"),
    ("[bound]\nrho_margin = 0.0\n", r"bound: unknown table or key"),
    ("[bounds]\n", r"sets no bound. set at least one of rho_margin"),
    ("[bounds]\nrho_margin = 'small'\n", r"bounds.rho_margin: 'small' has the wrong type"),
    ("[bounds]\nrho_margin = 1.0\n", r"bounds.rho_margin: must lie in \[0, 1\)"),
    ("[bounds]\nmax_input_norm = -1.0\n", r"bounds.max_input_norm: must be > 0"),
    ("[bounds]\nmax_lyapunov = nan\n", r"bounds.max_lyapunov: is NaN"),
    ("[bounds]\nrho_margin = 0.0\n[settings]\ndtype = 'float8'\n", r"settings.dtype: 'float8' is not allowed"),
    ("[bounds]\nrho_margin = 0.0\n[settings]\ngrowth_multiple = 1\n", r"settings.growth_multiple: must be ≥ 2"),
])
def test_a_bad_bounds_file_is_refused_with_the_field_and_the_fix(tmp_path, text, says):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=says) as err:
        load_bounds(path)
    assert str(path) in str(err.value) or "does not exist" in str(err.value)


def test_a_missing_bounds_file_is_refused():
    with pytest.raises(ConfigError, match="nowhere.toml does not exist"):
        load_bounds("nowhere.toml")
