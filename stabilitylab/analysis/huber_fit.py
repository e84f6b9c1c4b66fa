"""Robust regression of log-sum-exp models from many starts at once.

The model is log L̂_i(θ) = LSE_k(J_ik · θ), J of shape (n points, K terms, P params)
(scaling.py writes every law this way). The objective, with point weights m_i (1, or
bootstrap multiplicities):

    H(θ) = Σ_i m_i ρ(r_i),   r_i = log L̂_i − log L_i,   ρ(r) = r²/2 if |r| ≤ δ else δ(|r| − δ/2)

Exact derivatives, with w_i = softmax_k(J_ik · θ) and g_i = Σ_k w_ik J_ik = ∇ log L̂_i:

    ∇H  = Σ_i m_i ρ'(r_i) g_i,                                      ρ'(r) = clip(r, −δ, δ)
    ∇²H = Σ_i m_i [(ρ''(r_i) − ρ'(r_i)) g_i g_iᵀ + ρ'(r_i) Σ_k w_ik J_ik J_ikᵀ],   ρ'' = 1[|r| ≤ δ]

since ∇² log L̂_i = Σ_k w_ik J_ik J_ikᵀ − g_i g_iᵀ.

`_minimise` runs a damped Newton method on all starts as one batch. With
∇²H = V diag(λ) Vᵀ the step is −V diag(1/(|λ| + μ·max|λ|)) Vᵀ ∇H (|λ| keeps it a descent
step where ∇²H is indefinite), at most MAX_STEP long; μ, per start, shrinks after a step
that lowers H and grows after one that does not. For small δ, H is nearly Σ|r| and
Newton crawls from kink to kink, so δ is lowered in stages from 100·δ (nearly least
squares) to δ, each stage starting where the last ended (CONTINUATION).

`fit_starts` ranks all starts by H, keeps the best KEEP, minimises them together and
polishes the best few distinct ends with scipy's L-BFGS-B.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

MAX_STEP = 10.0  # longest Newton step, in units of θ (log-coefficients, exponents)
CONTINUATION = (100.0, 10 ** 1.5, 10.0, 10 ** 0.5, 1.0)  # δ of each stage, in units of the final δ
KEEP = 256  # starts that go on from their initial H
NEAR = 0.01  # ends polished and kept as bootstrap starts: H within this fraction of the best


class _Problem:
    """J, log L and the products of J's rows that ∇²H needs, as float64 arrays with
    the points of each term adjacent, so that every sum over points is one matrix product:
    J (K·n, P), J_ik J_ikᵀ (K·n, P²), J_ik J_ilᵀ (K·K·n, P²)."""

    def __init__(self, J: np.ndarray, logL: np.ndarray):
        n, self.K, self.P = J.shape
        Jk = np.asarray(J, dtype=np.float64).transpose(1, 0, 2)  # (K, n, P)
        self.J = Jk.reshape(self.K * n, self.P)
        self.JJ = np.einsum("kip,kiq->kipq", Jk, Jk).reshape(self.K * n, self.P ** 2)
        self.JJ_pairs = np.einsum("kip,liq->klipq", Jk, Jk).reshape(self.K * self.K * n, self.P ** 2)
        self.logL = np.asarray(logL, dtype=np.float64)

    def derivatives(self, theta: np.ndarray, weights: np.ndarray, delta: float, hessian: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """H, ∇H (and ∇²H) for a batch of θ (S, P) with weights (S, n)."""
        S, K, P = theta.shape[0], self.K, self.P
        u = (theta @ self.J.T).reshape(S, K, -1)
        top = u.max(axis=1, keepdims=True)
        e = np.exp(u - top)
        total = e.sum(axis=1, keepdims=True)
        r = (top + np.log(total)).squeeze(1) - self.logL
        w = e / total  # softmax over the terms, (S, K, n)
        inside = np.abs(r) <= delta
        f = (weights * np.where(inside, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))).sum(-1)
        d1w = (weights * np.clip(r, -delta, delta))[:, None] * w
        grad = d1w.reshape(S, -1) @ self.J
        if not hessian:
            return f, grad, None
        cw = (weights * inside)[:, None] * w - d1w
        pairs = (cw[:, :, None] * w[:, None]).reshape(S, -1)
        hess = (d1w.reshape(S, -1) @ self.JJ + pairs @ self.JJ_pairs).reshape(S, P, P)
        return f, grad, hess


def huber_objective(J: np.ndarray, logL: np.ndarray, theta: np.ndarray, delta: float) -> float:
    """H(θ) with unit weights."""
    problem = _Problem(J, logL)
    f, _, _ = problem.derivatives(np.asarray(theta, dtype=np.float64)[None], np.ones((1, len(logL))), delta,
                                  hessian=False)
    return float(f[0])


def _newton(problem: _Problem, theta: np.ndarray, weights: np.ndarray, delta: float, max_iter: int,
            ftol: float = 1e-12, xtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Damped Newton steps on every θ at once → (θ, H). A start stops when a step gains
    less than ftol·H, moves less than xtol·(1 + ‖θ‖), or its damping passes 1e10
    (no step lowers H: a minimum up to rounding)."""
    theta = theta.copy()
    f, g, H = problem.derivatives(theta, weights, delta)
    damping = np.full(f.shape, 1e-3)
    active = np.arange(len(theta))
    with np.errstate(over="ignore", invalid="ignore"):  # a far-off trial may overflow; it is then rejected
        for _ in range(max_iter):
            if not len(active):
                break
            lam, V = np.linalg.eigh(H[active])
            scale = np.maximum(np.abs(lam).max(axis=-1, keepdims=True), 1e-300)
            coeff = (V.swapaxes(-1, -2) @ g[active, :, None]).squeeze(-1) / (np.abs(lam) + damping[active, None] * scale)
            step = -(V @ coeff[..., None]).squeeze(-1)
            length = np.linalg.norm(step, axis=-1)
            step = step * np.minimum(MAX_STEP / np.maximum(length, 1e-300), 1.0)[:, None]
            trial = theta[active] + step
            f_t, g_t, H_t = problem.derivatives(trial, weights[active], delta)
            better = f_t < f[active]
            gain = f[active] - f_t
            moved = active[better]
            theta[moved], f[moved], g[moved], H[moved] = trial[better], f_t[better], g_t[better], H_t[better]
            damping[active] = np.where(better, damping[active] / 3, damping[active] * 4)
            done = ((better & (gain <= ftol * np.abs(f_t)))
                    | (length <= xtol * (1 + np.linalg.norm(theta[active], axis=-1)))
                    | (damping[active] > 1e10))
            active = active[~done]
    return theta, f


def _minimise(problem: _Problem, starts: np.ndarray, delta: float, weights: np.ndarray | None = None,
              iters_per_stage: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Every start minimised at once through the CONTINUATION stages → (θ (S, P), H (S,)).
    weights: (S, n) point weights, or None for ones."""
    theta = np.asarray(starts, dtype=np.float64)
    m = np.ones((len(theta), len(problem.logL))) if weights is None else np.asarray(weights, dtype=np.float64)
    for scale in CONTINUATION:
        theta, f = _newton(problem, theta, m, scale * delta, iters_per_stage)
    return theta, f


def _polish(problem: _Problem, theta: np.ndarray, delta: float) -> tuple[np.ndarray, float]:
    """scipy L-BFGS-B from θ with the exact gradient."""
    ones = np.ones((1, len(problem.logL)))

    def fun(t: np.ndarray) -> tuple[float, np.ndarray]:
        f, grad, _ = problem.derivatives(np.asarray(t, dtype=np.float64)[None], ones, delta, hessian=False)
        return float(f[0]), grad[0]

    res = minimize(fun, theta, jac=True, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 200})
    return res.x, float(res.fun)


def _distinct(theta: np.ndarray, f: np.ndarray, count: int, tol: float = 1e-4) -> np.ndarray:
    """Up to `count` ends with the lowest H, no two within tol (max-norm) of each other."""
    picked: list[np.ndarray] = []
    for i in np.argsort(np.where(np.isfinite(f), f, np.inf)):
        if len(picked) == count or not np.isfinite(f[i]):
            break
        if all(np.abs(theta[i] - p).max() > tol for p in picked):
            picked.append(theta[i])
    return np.array(picked)


def fit_starts(J: np.ndarray, logL: np.ndarray, starts: np.ndarray, delta: float, keep: int = KEEP,
               polish: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The best θ from the `keep` starts of lowest initial H, and up to `polish` distinct
    ends with H within NEAR of the best (polished by L-BFGS-B, best first)."""
    problem = _Problem(J, logL)
    f0, _, _ = problem.derivatives(np.asarray(starts, dtype=np.float64), np.ones((len(starts), len(logL))), delta,
                                   hessian=False)
    starts = starts[np.argsort(np.where(np.isfinite(f0), f0, np.inf), kind="stable")[:keep]]
    theta, f = _minimise(problem, starts, delta)
    if not np.isfinite(f).any():
        raise ValueError("L: the fit diverged from every start; check the data for outliers or a wrong law")
    near = f <= np.nanmin(f) * (1 + NEAR)
    finalists = _distinct(theta[near], f[near], polish)
    polished = [_polish(problem, t, delta) for t in finalists]  # L-BFGS-B never ends above its start
    ends = _distinct(np.array([t for t, _ in polished]), np.array([fp for _, fp in polished]), polish)
    return ends[0], ends


def refit(J: np.ndarray, logL: np.ndarray, starts: np.ndarray, delta: float, counts: np.ndarray) -> np.ndarray:
    """θ (B, P) for each row of counts (B, n) (bootstrap multiplicities), best of `starts` each."""
    B, m = len(counts), len(starts)
    theta, f = _minimise(_Problem(J, logL), np.tile(starts, (B, 1)), delta, weights=np.repeat(counts, m, axis=0))
    f = np.where(np.isfinite(f), f, np.inf).reshape(B, m)
    return theta.reshape(B, m, -1)[np.arange(B), f.argmin(axis=1)]
