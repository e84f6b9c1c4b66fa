"""Pure numerics on series: smoothing, display downsampling, seed bands. No Streamlit here."""

from __future__ import annotations

import math
import warnings

import numpy as np

EXP_SPAN = 300.0  # largest exponent used inside one block of the EMA (e^300 ≈ 1e130, far from overflow)


def ema(steps: np.ndarray, values: np.ndarray, halflife: float) -> np.ndarray:
    """Time-weighted, debiased exponential moving average.

    s_i = Σ_{j≤i} w_ij y_j / Σ_{j≤i} w_ij with w_ij = 2^(−(x_i − x_j)/halflife), so a gap of
    many steps forgets as much as that many steps would, and the start is not pulled toward
    zero. Non-finite values are skipped (their output is the smoothed value so far).
    `steps` must be non-decreasing. halflife ≤ 0 returns the values unchanged.
    """
    y = np.asarray(values, dtype=float)
    if halflife <= 0 or y.size == 0:
        return y.copy()
    a = (np.asarray(steps, dtype=float) - steps[0]) * (math.log(2) / halflife)
    finite = np.isfinite(y)
    y0, w0 = np.where(finite, y, 0.0), finite.astype(float)
    num, den = np.empty_like(y), np.empty_like(y)
    carry_num = carry_den = 0.0
    carry_a, start = a[0], 0
    while start < len(y):  # blocks in which a spans < EXP_SPAN, so exp() stays finite
        stop = max(int(np.searchsorted(a, a[start] + EXP_SPAN)), start + 1)
        rel = a[start:stop] - a[start]
        grow, shrink = np.exp(rel), np.exp(-rel)
        carried = math.exp(-(a[start] - carry_a))
        num[start:stop] = shrink * (np.cumsum(grow * y0[start:stop]) + carry_num * carried)
        den[start:stop] = shrink * (np.cumsum(grow * w0[start:stop]) + carry_den * carried)
        carry_num, carry_den, carry_a, start = num[stop - 1], den[stop - 1], a[stop - 1], stop
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def minmax_indices(values: np.ndarray, points: int) -> np.ndarray:
    """Indices that keep the shape of a long series in about `points` points: the first and
    last point, and the minimum and maximum of each of points/2 equal buckets (min-max
    decimation keeps spikes, which averaging or striding would hide). Non-finite values
    are never chosen as extremes; a bucket without a finite value keeps its first index
    (so a NaN gap stays a gap)."""
    y = np.asarray(values, dtype=float)
    n = len(y)
    if n <= max(points, 2):
        return np.arange(n)
    buckets = max(points // 2, 1)
    edges = np.linspace(0, n, buckets + 1).astype(int)
    width = int(np.diff(edges).max())
    index = edges[:-1, None] + np.arange(width)[None, :]  # (buckets, width), padded past the bucket end
    valid = index < edges[1:, None]
    index = np.minimum(index, n - 1)
    block = y[index]
    finite = valid & np.isfinite(block)
    lo = np.where(finite, block, np.inf).argmin(axis=1)
    hi = np.where(finite, block, -np.inf).argmax(axis=1)
    rows = np.arange(buckets)  # an all-NaN bucket: argmin/argmax give 0, its first index
    return np.unique(np.concatenate([index[rows, lo], index[rows, hi], [0, n - 1]]))


def value_at(steps: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The series at steps `at`, interpolated between its finite points (NaN if it has none)."""
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    if not finite.any():
        return np.full(np.shape(at), np.nan)
    return np.interp(np.asarray(at, dtype=float), steps[finite], values[finite])


def seed_band(series: list[tuple[np.ndarray, np.ndarray]],
              spread: str = "std") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean ± one standard deviation (spread="std") or mean within min–max (spread="range")
    of several seeds' (steps, values), on the union of their steps (each seed interpolated
    at steps inside its own range; finite values only). Returns (steps, mean, lower, upper)."""
    steps = np.unique(np.concatenate([np.asarray(s) for s, _ in series]))
    stack = np.full((len(series), len(steps)), np.nan)
    for row, (s, v) in zip(stack, series):
        v = np.asarray(v, dtype=float)
        finite = np.isfinite(v)
        if finite.any():
            inside = (steps >= np.asarray(s)[finite].min()) & (steps <= np.asarray(s)[finite].max())
            row[inside] = np.interp(steps[inside], np.asarray(s)[finite], v[finite])
    with warnings.catch_warnings():  # a step where no seed is finite: NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stack, axis=0)
        if spread == "range":
            return steps, mean, np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
        std = np.nanstd(stack, axis=0)
    return steps, mean, mean - std, mean + std


def decay_rates(eigenvalues: np.ndarray) -> np.ndarray:
    """−log|λ| per eigenvalue: how fast each mode of the linearised loop decays per
    iteration (negative: the mode grows, ρ(Ā) > 1)."""
    with np.errstate(divide="ignore"):
        return -np.log(np.abs(np.asarray(eigenvalues)))
