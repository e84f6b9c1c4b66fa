"""The lab's analyses of looped models: the loop as a dynamical system, and scaling laws.

Names load lazily (PEP 562): `stabilitylab.analysis.scaling` is numpy and scipy only, so
the dashboard can fit laws without importing torch; `events` is numpy and pandas only.
"""

from __future__ import annotations

from stabilitylab.lazy import lazy_namespace

_MODULES = {
    "bounds": ("BoundResult", "Bounds", "CheckReport", "CheckSettings", "check_bounds", "load_bounds"),
    "divergence": ("DivergenceMonitor", "Verdict"),
    "estimate": ("RadiusEstimate", "RadiusTracker", "causal_prefix", "probe_view", "trace_rate"),
    "events": ("EarlyWarning", "History", "RunEvents", "WarningRules", "analyse", "analyse_run",
               "find_divergence", "find_spikes", "warning_table", "forecast_signals", "warning_scores"),
    "forecast": ("held", "level_forecast", "state_forecast", "sustained"),
    "lyapunov": ("FiniteTimeLyapunov", "LyapunovSpectrum", "finite_time_lyapunov", "loop_lyapunov",
                 "lyapunov_spectrum"),
    "scaling": ("CHINCHILLA", "TEST_TIME_FORMS", "TRAINING", "UNIFIED", "Allocation", "Fit", "Law",
                "fit_chinchilla", "fit_law", "fit_test_time", "fit_test_time_forms", "fit_training",
                "fit_unified", "optimal_allocation"),
    "sweep": ("sweep_points",),
    "spectra": ("JacobianSpectrum", "eigenvalues", "jacobian_spectral_radius", "loop_jacobian", "spectral_norm",
                "spectral_radius"),
}
__getattr__, __dir__, __all__ = lazy_namespace(
    __name__, {name: f"{__name__}.{module}" for module, names in _MODULES.items() for name in names})
