"""Stability checks for your own test suite: assertion helpers and a pytest plugin.

Helpers (each one bound of stabilitylab.analysis.bounds; a failure raises StabilityError,
an AssertionError whose message shows measured vs allowed; a pass returns the BoundResult):

    assert_contractive(model_or_injection, margin=0.0, dtype="float32")   ρ(Ā) < 1 − margin
    assert_state_bounded(model, tokens, growth=1.5, depth_multiple=4)      ‖h_T‖/‖h_μ‖ ≤ growth
    assert_jacobian_radius_below(model, tokens, bound, depth=None)         ρ(∂F/∂h) ≤ bound
    assert_lyapunov_below(model, tokens, bound, depth=None)                λ₁ ≤ bound
    assert_depth_extrapolates(model, tokens, targets, tolerance=0.0)       L(2μ) − L(μ) ≤ tolerance
    assert_within_bounds(model_or_target, "bounds.toml", tokens=...)       a whole bounds file

depth defaults to 2 μ_rec, the position to the last token, h0 to a fixed seeded draw.

The pytest plugin (entry point `stabilitylab`, active once stabilitylab is installed):

    pytest --stability-bounds bounds.toml --stability-target runs/x --stability-target parcae-140m/
        adds one test per (target, bound): the run of `stabilitylab check`, inside pytest
    def test_mine(stability_check):               # fixture: check a model or a target path
        stability_check(model, tokens=x, targets=y)                  # bounds from the marker or option
    @pytest.mark.stability(bounds="bounds.toml")  # the bounds file for stability_check in this test

torch is imported only when a check runs, so the plugin costs nothing to a test run that
does not use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from torch import Tensor

    from stabilitylab.analysis.bounds import BoundResult, Bounds, CheckReport
    from stabilitylab.model import Injection, LoopedLM


class StabilityError(AssertionError):
    """A stability bound does not hold; the message shows measured vs allowed."""


def _verdict(result: BoundResult) -> BoundResult:
    if not result.passed:
        raise StabilityError(result.message())
    return result


def _state(model: LoopedLM, tokens: Tensor, h0: Tensor | None) -> Tensor:
    from stabilitylab.analysis.bounds import default_state

    return default_state(model, tokens) if h0 is None else h0


def _depth(model: LoopedLM, depth: int | None) -> int:
    return 2 * model.mu_rec if depth is None else depth


def assert_contractive(model_or_injection: LoopedLM | Injection, margin: float = 0.0,
                       dtype: str = "float32") -> BoundResult:
    """ρ(Ā) < 1 − margin with Ā rounded to `dtype` (exp(−Δa) that rounds to 1.0 fails)."""
    from stabilitylab.analysis.bounds import rho_bound

    return _verdict(rho_bound(model_or_injection, margin, dtype))


def assert_state_bounded(model: LoopedLM, tokens: Tensor, growth: float = 1.5, depth_multiple: int = 4,
                         h0: Tensor | None = None) -> BoundResult:
    """‖h_T‖ / ‖h_μ‖ ≤ growth, T = depth_multiple · μ_rec (mean per-token state norms)."""
    from stabilitylab.analysis.bounds import state_growth_bound

    return _verdict(state_growth_bound(model, tokens, _state(model, tokens, h0), growth, depth_multiple))


def assert_jacobian_radius_below(model: LoopedLM, tokens: Tensor, bound: float, depth: int | None = None,
                                 position: int = -1, h0: Tensor | None = None) -> BoundResult:
    """ρ(∂F/∂h) at h_depth ≤ bound, per-token view at `position`."""
    from stabilitylab.analysis.bounds import jacobian_bound

    return _verdict(jacobian_bound(model, tokens, _state(model, tokens, h0), bound, _depth(model, depth), position))


def assert_lyapunov_below(model: LoopedLM, tokens: Tensor, bound: float, depth: int | None = None,
                          position: int = -1, h0: Tensor | None = None) -> BoundResult:
    """The largest Lyapunov exponent along h_0 → h_depth ≤ bound."""
    from stabilitylab.analysis.bounds import lyapunov_bound

    return _verdict(lyapunov_bound(model, tokens, _state(model, tokens, h0), bound, _depth(model, depth), position))


def assert_depth_extrapolates(model: LoopedLM, tokens: Tensor, targets: Tensor, tolerance: float = 0.0,
                              h0: Tensor | None = None) -> BoundResult:
    """L(2 μ_rec) − L(μ_rec) ≤ tolerance: looping twice as long as trained costs at most
    `tolerance` nats per token."""
    from stabilitylab.analysis.bounds import depth_loss_bound

    return _verdict(depth_loss_bound(model, tokens, targets, _state(model, tokens, h0), tolerance))


def assert_within_bounds(model_or_target: LoopedLM | str | Path, bounds: Bounds | str | Path,
                         tokens: Tensor | None = None, targets: Tensor | None = None,
                         h0: Tensor | None = None) -> CheckReport:
    """Every bound of a bounds file (or a Bounds, with default settings) on a model or on a
    target path (a run, checkpoint file or parcae_lm directory, with its own batch); the
    StabilityError shows the whole table."""
    report = _check(model_or_target, bounds, tokens, targets, h0)
    if not report.passed:
        raise StabilityError("\n" + report.table())
    return report


def _check(model_or_target: Any, bounds: Any, tokens: Tensor | None, targets: Tensor | None,
           h0: Tensor | None) -> CheckReport:
    from stabilitylab.analysis.bounds import Bounds, CheckSettings, check_bounds, load_bounds
    from stabilitylab.targets import check_target

    bounds, settings = (bounds, CheckSettings()) if isinstance(bounds, Bounds) else load_bounds(bounds)
    if not isinstance(model_or_target, (str, Path)):
        return check_bounds(model_or_target, bounds, settings, tokens, targets, h0)
    if not (tokens is None and targets is None and h0 is None):
        raise ValueError("a target path brings its own batch (docs/checks.md, Targets); to check on your own "
                         "tokens, load the model (stabilitylab.targets.load_target(path).model) and pass it")
    return check_target(model_or_target, bounds, settings)


# ---- the pytest plugin --------------------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stabilitylab", "stability bounds of looped models (stabilitylab.testing)")
    group.addoption("--stability-bounds", metavar="FILE", default=None,
                    help="bounds TOML for --stability-target and the stability_check fixture")
    group.addoption("--stability-target", metavar="TARGET", action="append", default=[],
                    help="a run, checkpoint file or parcae_lm directory to check against --stability-bounds: "
                         "one test per bound (repeatable)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stability(bounds): the bounds file the stability_check fixture uses")


@pytest.fixture
def stability_check(request: pytest.FixtureRequest):
    """check(model_or_target, bounds=None, tokens=None, targets=None, h0=None) -> CheckReport;
    fails the test with the table when a bound fails. bounds: the argument, else the test's
    @pytest.mark.stability(bounds=...), else --stability-bounds."""
    marker = request.node.get_closest_marker("stability")
    default = (marker.kwargs.get("bounds") if marker else None) or request.config.getoption("stability_bounds")

    def check(model_or_target: Any, bounds: Any = None, tokens: Any = None, targets: Any = None,
              h0: Any = None) -> CheckReport:
        chosen = bounds if bounds is not None else default
        if chosen is None:
            raise pytest.UsageError("stability_check has no bounds: pass bounds=, mark the test "
                                    "@pytest.mark.stability(bounds=FILE), or run pytest --stability-bounds FILE")
        report = _check(model_or_target, chosen, tokens, targets, h0)
        if not report.passed:
            pytest.fail(report.table(), pytrace=False)
        return report

    return check


class StabilityItem(pytest.Item):
    """One bound of one --stability-target; the target is measured once, for all its bounds."""

    def __init__(self, *, target: str, bound: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.target, self.bound = target, bound

    def runtest(self) -> None:
        reports = self.config.stash.setdefault(_REPORTS, {})
        if self.target not in reports:
            from stabilitylab.analysis.bounds import load_bounds
            from stabilitylab.targets import check_target

            bounds, settings = load_bounds(self.config.getoption("stability_bounds"))
            reports[self.target] = check_target(self.target, bounds, settings)
        _verdict(reports[self.target].result(self.bound))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        from stabilitylab.config import ConfigError
        from stabilitylab.store import StoreError

        if isinstance(excinfo.value, (StabilityError, ConfigError, StoreError)):  # a verdict, or a bad target
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"stability: {self.target} {self.bound}"


_REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Add one StabilityItem per (--stability-target, bound of --stability-bounds)."""
    targets, path = config.getoption("stability_target"), config.getoption("stability_bounds")
    if not targets:
        return
    if not path:
        raise pytest.UsageError("--stability-target needs --stability-bounds FILE")
    from stabilitylab.analysis.bounds import load_bounds
    from stabilitylab.config import ConfigError

    try:
        bounds, _ = load_bounds(path)
    except ConfigError as err:
        raise pytest.UsageError(f"--stability-bounds: {err}") from None
    for target in targets:
        for bound in bounds.names():
            name = f"stability[{target}::{bound}]"
            items.append(StabilityItem.from_parent(session, name=name, nodeid=name, target=target, bound=bound))


__all__ = ["StabilityError", "assert_contractive", "assert_state_bounded", "assert_jacobian_radius_below",
           "assert_lyapunov_below", "assert_depth_extrapolates", "assert_within_bounds"]
