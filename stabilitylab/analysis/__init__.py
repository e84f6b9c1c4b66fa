"""The lab's analyses of looped models: the loop as a dynamical system, and scaling laws.

Names load lazily (PEP 562): `stabilitylab.analysis.scaling` is numpy and scipy only, so
the dashboard can fit laws without importing torch; `events` is numpy and pandas only.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "bounds": ("BoundResult", "Bounds", "CheckReport", "CheckSettings", "check_bounds", "load_bounds"),
    "events": ("DivergenceRules", "EarlyWarning", "History", "RunEvents", "WarningRules", "analyse", "analyse_run",
               "find_divergence", "find_spikes", "warning_table"),
    "lyapunov": ("FiniteTimeLyapunov", "LyapunovSpectrum", "finite_time_lyapunov", "loop_lyapunov",
                 "lyapunov_spectrum"),
    "scaling": ("CHINCHILLA", "TEST_TIME_FORMS", "TRAINING", "UNIFIED", "Allocation", "Fit", "Law",
                "fit_chinchilla", "fit_law", "fit_test_time", "fit_test_time_forms", "fit_training",
                "fit_unified", "optimal_allocation"),
    "sweep": ("sweep_points",),
    "spectra": ("JacobianSpectrum", "eigenvalues", "jacobian_spectral_radius", "loop_jacobian", "spectral_norm",
                "spectral_radius"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"stabilitylab.analysis.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'stabilitylab.analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
