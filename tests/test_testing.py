"""stabilitylab.testing: the assertion helpers pass and fail with measured vs allowed, and the
pytest plugin (entry point `stabilitylab`) runs the same checks inside a user's pytest."""

import copy
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stabilitylab.analysis.bounds import Bounds
from stabilitylab.config import ModelConfig
from stabilitylab.model import STABLE_BY_CONSTRUCTION, LoopedLM
from stabilitylab.formats.parcae_lm import save_parcae_checkpoint
from stabilitylab.testing import (StabilityError, assert_contractive, assert_depth_extrapolates,
                                  assert_jacobian_radius_below, assert_lyapunov_below, assert_state_bounded,
                                  assert_within_bounds)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
DECAY = 0.4472136  # Ā = √(1/5) at init


@functools.cache
def _built(injection: str) -> LoopedLM:
    torch.manual_seed(0)
    return LoopedLM(ModelConfig.preset("tiny", injection=injection, init_state="zero")).eval()


def tiny(injection: str, a: float | None = None) -> LoopedLM:
    """A fresh tiny model, identity core and h_0 = 0 (the loop is linear); a sets a free-diagonal Ā = a·I."""
    model = copy.deepcopy(_built(injection))
    if a is not None:
        with torch.no_grad():
            model.injection.a.fill_(a)
    return model


TOKENS = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
X, Y = TOKENS[:, :-1], TOKENS[:, 1:]


@pytest.mark.parametrize("name", sorted(STABLE_BY_CONSTRUCTION))
def test_injections_stable_by_construction_are_contractive_in_bfloat16_at_init(name):
    result = assert_contractive(tiny(name), dtype="bfloat16")
    assert result.measured == pytest.approx(DECAY, rel=1e-2)  # bfloat16 keeps 8 bits


def test_assert_contractive_takes_an_injection_and_shows_measured_vs_allowed():
    with pytest.raises(StabilityError) as err:
        assert_contractive(tiny("free-diagonal", a=1.2).injection)
    assert str(err.value).startswith("rho_margin: ρ(Ā) in float32 = 1.2, allowed < 1 (margin -0.2")
    with pytest.raises(StabilityError, match=r"= 0.447214, allowed < 0.4 \(margin -0.0472"):
        assert_contractive(tiny("parcae"), margin=0.6)


def test_assert_contractive_catches_bfloat16_saturation():
    model = tiny("parcae")
    with torch.no_grad():
        model.injection.A_log.fill_(-8.0)  # Δa = 0.80 · e⁻⁸ ≈ 2.7e-4: exp(−Δa) is 1.0 in bfloat16
    assert_contractive(model, dtype="float32")
    with pytest.raises(StabilityError, match=r"ρ\(Ā\) in bfloat16 = 1, allowed < 1 .*exact 1 − ρ 0.00026"):
        assert_contractive(model, dtype="bfloat16")


def test_assert_state_bounded_passes_a_converging_loop_and_fails_a_growing_one():
    assert assert_state_bounded(tiny("parcae"), X, growth=1.2).measured < 1.2
    with pytest.raises(StabilityError, match=r"‖h_12‖ / ‖h_3‖ = 4, allowed ≤ 1.2"):  # add: h_t = t·e
        assert_state_bounded(tiny("add"), X, growth=1.2)


def test_assert_jacobian_radius_and_lyapunov_below():
    assert assert_jacobian_radius_below(tiny("parcae"), X, 0.5).measured == pytest.approx(DECAY, rel=1e-6)
    assert assert_lyapunov_below(tiny("parcae"), X, -0.5).measured == pytest.approx(-0.804719, rel=1e-5)
    pushed = tiny("free-diagonal", a=1.2)
    with pytest.raises(StabilityError, match=r"ρ\(∂F/∂h\) at h_6 = 1.2, allowed ≤ 1"):
        assert_jacobian_radius_below(pushed, X, 1.0)
    with pytest.raises(StabilityError, match=r"λ₁ over 6 iterations = 0.18232\d*, allowed ≤ 0"):
        assert_lyapunov_below(pushed, X, 0.0)


def test_assert_depth_extrapolates_compares_the_losses_at_one_and_two_mu():
    result = assert_depth_extrapolates(tiny("parcae"), X, Y, tolerance=0.05)
    with pytest.raises(StabilityError, match=r"L\(6\) − L\(3\) = .*, allowed ≤ "):
        assert_depth_extrapolates(tiny("parcae"), X, Y, tolerance=result.measured - 1e-3)


def test_assert_within_bounds_checks_a_whole_file_on_a_model_or_a_run(pushed_lab):
    report = assert_within_bounds(tiny("parcae"), ROOT / "checks" / "bounds.toml", tokens=X, targets=Y)
    assert report.passed and len(report.results) == 7
    assert_within_bounds(pushed_lab / "stable-dense", Bounds(rho_margin=0.0, max_lyapunov=0.0))
    with pytest.raises(StabilityError) as err:
        assert_within_bounds(pushed_lab / "concat", Bounds(rho_margin=0.0, max_readout_norm=100.0))
    assert "rho_margin" in str(err.value) and "1 of 2 bounds fail: rho_margin" in str(err.value)
    with pytest.raises(ValueError, match="a target path brings its own batch"):
        assert_within_bounds(pushed_lab / "concat", Bounds(max_lyapunov=0.0), tokens=X)


# ---- the pytest plugin, in a pytest of its own -------------------------------------------------------------

USER_TESTS = '''
import pytest, torch
from stabilitylab.config import ModelConfig
from stabilitylab.model import LoopedLM
from stabilitylab.testing import assert_contractive

def model(injection):
    torch.manual_seed(0)
    return LoopedLM(ModelConfig.preset("tiny", injection=injection)).eval()

def test_helper():
    assert_contractive(model("parcae"))

@pytest.mark.stability(bounds="bounds.toml")
def test_fixture_with_marker(stability_check):
    x = torch.randint(0, 64, (2, 9))
    stability_check(model("parcae"), tokens=x[:, :-1], targets=x[:, 1:])

def test_fixture_with_option_fails(stability_check):
    m = model("free-diagonal")
    with torch.no_grad():
        m.injection.a.fill_(1.2)
    stability_check(m, tokens=torch.randint(0, 64, (2, 8)))
'''


def run_pytest(where: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest on a shared machine
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=where,
                          capture_output=True, text=True, env=env)


def test_the_plugin_checks_inside_a_users_pytest_by_fixture_marker_and_per_target_items(tmp_path):
    """One pytest run: the user's tests (a helper, the fixture with the marker's bounds, the fixture
    with --stability-bounds), and one item per bound of each --stability-target."""
    torch.manual_seed(0)
    save_parcae_checkpoint(LoopedLM(ModelConfig(vocab_size=96, block_size=32, d_model=64, n_heads=2, n_prelude=1,
                                                n_core=2, n_coda=1, mean_recurrence=4, backprop_depth=2,
                                                value_embed_layers=(1, 3))), tmp_path / "model")
    (tmp_path / "bounds.toml").write_text("[bounds]\nrho_margin = 0.0\nmax_state_growth = 1.5\n")
    (tmp_path / "strict.toml").write_text("[bounds]\nrho_margin = 0.5\nmax_input_norm = 0.5\n"
                                          "max_jacobian_radius = 1.0\n")
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    done = run_pytest(tmp_path, "test_user.py", "--stability-bounds", "strict.toml", "--stability-target", "model",
                      "--stability-target", "missing")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "5 failed, 4 passed" in done.stdout
    failed = sorted(line.split(" - ")[0] for line in done.stdout.splitlines() if line.startswith("FAILED"))
    assert failed == ["FAILED stability[missing::max_input_norm]", "FAILED stability[missing::max_jacobian_radius]",
                      "FAILED stability[missing::rho_margin]", "FAILED stability[model::max_input_norm]",
                      "FAILED test_user.py::test_fixture_with_option_fails"]
    # the fixture fails with the whole table; an item with its bound's line; a bad target with the reason
    assert "ρ(Ā) in float32  1.2       < 0.5" in done.stdout
    assert "max_input_norm: ‖B̄‖₂ = 0.804719, allowed ≤ 0.5 (margin -0.304719): FAILS" in done.stdout
    assert "missing: target: is not a run directory, a run id in lab runs" in done.stdout
    done = run_pytest(tmp_path, "--stability-target", "model")
    assert done.returncode == 4 and "--stability-target needs --stability-bounds FILE" in done.stderr
