"""The Chinchilla fit from Besiroglu et al.'s grid of 4500 starts (α, β ∈ {0, .5, …, 2},
e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25}): stabilitylab's batched fit against a plain
loop of scipy L-BFGS-B calls, one per start, measured side by side in one run.

The plain loop runs every SUBSET_STRIDE-th start of the grid and its total is the
measured time per start × 4500 (the printout says so). It runs twice: with the
finite-difference gradient scipy uses when given no jac (as Besiroglu et al.'s code
does), and with the exact gradient. Both sides are numpy and scipy on their default
threads (arrays of a few hundred entries and 5×5 Hessians: no threading to speak of).

    make bench        # or: .venv/bin/python -m pytest benchmarks --benchmark-only
"""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp

from stabilitylab.analysis.scaling import CHINCHILLA, fit_chinchilla

CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "external" / "chinchilla_svg_extracted_data.csv"
SUBSET_STRIDE = 90  # the plain loop runs 4500 / 90 = 50 starts spread over the grid
DELTA = 1e-3


def plain_huber(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray, logL: np.ndarray,
                gradient: bool) -> float | tuple[float, np.ndarray]:
    """Σ huber_δ(LSE(e, a − α log N, b − β log D) − log L), θ = (e, a, b, α, β), in plain numpy."""
    e, a, b, alpha, beta = theta
    u = np.stack([np.full_like(logN, e), a - alpha * logN, b - beta * logD])
    r = logsumexp(u, axis=0) - logL
    f = np.sum(np.where(np.abs(r) <= DELTA, 0.5 * r * r, DELTA * (np.abs(r) - 0.5 * DELTA)))
    if not gradient:
        return f
    w = np.exp(u - logsumexp(u, axis=0)) * np.clip(r, -DELTA, DELTA)
    return f, np.array([w[0].sum(), w[1].sum(), w[2].sum(), -(w[1] * logN).sum(), -(w[2] * logD).sum()])


def plain_loop(starts: np.ndarray, data: tuple, gradient: bool) -> tuple[float, np.ndarray, float]:
    """(best H, its θ, seconds per start) of one L-BFGS-B call per start, scipy defaults."""
    t0 = time.perf_counter()
    results = [minimize(plain_huber, s, args=(*data, gradient), jac=gradient, method="L-BFGS-B") for s in starts]
    seconds = (time.perf_counter() - t0) / len(starts)
    best = min(results, key=lambda r: r.fun)
    return float(best.fun), best.x, seconds


def test_batched_chinchilla_fit_against_a_plain_scipy_loop(benchmark, capsys):
    if not CSV.exists():
        pytest.skip(f"{CSV} is absent (the shared external data lives in ../shared beside the repo)")
    table = pd.read_csv(CSV).sort_values("loss").iloc[:-5]
    N, L = table["Model Size"].to_numpy(), table["loss"].to_numpy()
    D = table["Training FLOP"].to_numpy() / (6 * N)
    starts = CHINCHILLA.start_grid()
    assert len(starts) == 4500 and CHINCHILLA.params == ("E", "A", "B", "alpha", "beta")
    subset = starts[::SUBSET_STRIDE]
    data = (np.log(N), np.log(D), np.log(L))

    fd_best, fd_theta, fd_per_start = plain_loop(subset, data, gradient=False)
    exact_best, exact_theta, exact_per_start = plain_loop(subset, data, gradient=True)
    fit = benchmark.pedantic(fit_chinchilla, args=(N, D, L), kwargs=dict(bootstrap=0, max_starts=len(starts)),
                             rounds=3, iterations=1)
    ours = benchmark.stats.stats.median

    rows = [("batched (this lab)", ours, fit.huber, fit.theta),
            ("plain loop, finite-difference gradient", fd_per_start * len(starts), fd_best, fd_theta),
            ("plain loop, exact gradient", exact_per_start * len(starts), exact_best, exact_theta)]
    with capsys.disabled():
        print(f"\nChinchilla fit, 240 points, 4500 starts (numpy; its BLAS threads at their default); the plain loops ran "
              f"{len(subset)} starts (every {SUBSET_STRIDE}th) and are extrapolated to 4500 by time per start")
        for name, seconds, huber, theta in rows:
            p = np.exp(theta[:3])
            print(f"  {name:40s} {seconds:9.1f} s  ×{seconds / ours:8.1f}  huber {huber:.12g}  "
                  f"E {p[0]:.4f} A {p[1]:.2f} B {p[2]:.1f} alpha {theta[3]:.5f} beta {theta[4]:.5f}")
    benchmark.extra_info.update(plain_starts_run=len(subset),
                                speedup_vs_finite_difference_loop=fd_per_start * len(starts) / ours,
                                speedup_vs_exact_gradient_loop=exact_per_start * len(starts) / ours,
                                huber=fit.huber, huber_plain=min(fd_best, exact_best))
    # the same optimum: no plain start ends lower, and the parameters agree
    assert fit.huber <= min(fd_best, exact_best) * (1 + 1e-9)
    best_plain = fd_theta if fd_best <= exact_best else exact_theta
    np.testing.assert_allclose(fit.theta, best_plain, rtol=1e-3)
