"""Forecasts on series indexed by training step: when will a series reach a level, has it
stayed there. The building blocks of the early warning (analysis/events.py); numpy and
pandas only, on plain series, so they work on any run's record.

    level_forecast   τ_s: steps until the least-squares line through the last `window`
                     measurements reaches `level` (the line's value at s, not the last noisy one)
    state_forecast   the same for log ‖h_T‖ against log(bound), from the last measurement:
                     the divergence bound, extrapolated (the `state_trend` nowcast)
    sustained        the median over the last `window` steps > level, held on `patience`
                     consecutive steps: a level crossed and stayed crossed
    held             True where a condition held on the last `patience` entries
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def _line(x: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Slope b and fitted value ŷ at the last point of the least-squares line through each run
    of `window` consecutive points: b = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)², ŷ = ȳ + b (x_last − x̄)."""
    X = np.lib.stride_tricks.sliding_window_view(x, window)
    Y = np.lib.stride_tricks.sliding_window_view(y, window)
    dx = X - X.mean(axis=1, keepdims=True)
    slope = (dx * (Y - Y.mean(axis=1, keepdims=True))).sum(axis=1) / (dx * dx).sum(axis=1)
    return slope, Y.mean(axis=1) + slope * dx[:, -1]


def state_forecast(h_norm: pd.Series, bound: float, window: int) -> pd.Series:
    """τ_s: steps until log ‖h_T‖ reaches log `bound` along the least-squares line through
    its last `window` values, b = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)², τ = (log bound − y_s) / b;
    ∞ when b ≤ 0 or fewer than `window` finite values; 0 at or past the bound, or non-finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x, h = h_norm.index.to_numpy(dtype=float), h_norm.to_numpy(dtype=float)
        y = np.log(h)
        tau = np.full(len(y), np.inf)
        if len(y) >= window:
            slope, _ = _line(x, y, window)
            rising = np.isfinite(slope) & (slope > 0)
            tau[window - 1:] = np.where(rising, (math.log(bound) - y[window - 1:]) / np.where(rising, slope, 1), np.inf)
        tau[~(h < bound)] = 0.0  # at or past the bound, or NaN
    return pd.Series(tau, index=h_norm.index)


def level_forecast(series: pd.Series, level: float, window: int) -> pd.Series:
    """τ_s: steps until `series` reaches `level` along the least-squares line through its last
    `window` measurements (x = the step, so a sparse series forecasts in steps too),

        b = Σ(x − x̄)(y − ȳ) / Σ(x − x̄)²,   τ = (level − ŷ_s) / b,   ŷ_s = the line at s

    ∞ while b ≤ 0 or fewer than `window` measurements; 0 at or past the level, or non-finite.
    The line's value ŷ_s, not the last measurement, so one noisy estimate neither fires nor
    resets the forecast on its own (the per-step radius estimate varies with the batch)."""
    x, y = series.index.to_numpy(dtype=float), series.to_numpy(dtype=float)
    tau = np.full(len(y), np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if len(y) >= window:
            slope, fitted = _line(x, y, window)
            rising = np.isfinite(slope) & (slope > 0)
            ahead = np.where(rising, (level - fitted) / np.where(rising, slope, 1), np.inf)
            tau[window - 1:] = np.where(np.isfinite(fitted) & (fitted >= level), 0.0, np.maximum(ahead, 0.0))
        tau[~np.isfinite(y)] = 0.0
    return pd.Series(tau, index=series.index)


def held(fires: np.ndarray, patience: int) -> np.ndarray:
    """True where `fires` has held on the last `patience` entries."""
    run, out = 0, np.zeros(len(fires), dtype=bool)
    for i, ok in enumerate(fires):
        run = run + 1 if ok else 0
        out[i] = run >= patience
    return out


def sustained(series: pd.Series, level: float, window: int, patience: int) -> tuple[pd.Series, np.ndarray]:
    """(m, fires), on every step from the series' first to its last: m_s = the median of the
    series over the last `window` steps (a sparse series holds its last measurement between
    two, so the window is a span of training, whatever the cadence; NaN before `window` steps;
    a non-finite measurement counts as the largest float, an overflow), and fires where m > `level` has held
    on `patience` consecutive steps.

    Two filters, each against a different kind of noise: the median ignores up to half the
    window of outliers (a per-step estimate that jumps with the batch), the patience asks that
    the level, once crossed, stay crossed (a series that hovers at the level and falls back).
    "> level", not "≥": a series sitting exactly at the level (add's ρ(Ā) = 1) does not cross it."""
    values = series.to_numpy(dtype=float)
    clean = pd.Series(np.where(np.isnan(values) | np.isposinf(values), np.finfo(float).max, values),
                      index=series.index)  # finite: a rolling median over inf is NaN
    steps = np.arange(int(series.index.min()), int(series.index.max()) + 1) if len(series) else np.array([], int)
    m = clean.reindex(steps, method="ffill").rolling(window, min_periods=window).median()
    return m, held((m > level).to_numpy(), patience)


__all__ = ["state_forecast", "level_forecast", "held", "sustained"]
