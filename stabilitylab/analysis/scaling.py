"""Scaling laws: the forms of the Parcae paper and Chinchilla, fitted robustly.

Every law here is a sum of exponentials whose exponents are linear in the fitted
parameters θ:

    L̂ = Σ_k exp(u_k),   u_k = c_k − s_k · g_k(x)

c_k is the log of a coefficient (A = e^a), s_k an exponent or a rate, g_k a feature
of the inputs (log N, log D, T, ...); a constant term (E = e^e) has no s_k. So
log L̂ = LSE_k(u_k) with u = J θ, J holding the features (huber_fit.py fits that).

    chinchilla  L = E + A/N^α + B/D^β                         Hoffmann et al. 2022
    training    L = E + X·N^−x + Y·D^−y                       N = N(μ_rec), unrolled params
    test-time   exp         L = L∞ + Z·e^(−z·T)               docs/parcae.md §3 C5, the best form
                power1p     L = L∞ + Z·(1 + T)^(−z)
                power       L = L∞ + Z·T^(−z)
                pure-power  L = Z·T^(−z)
    unified     L = E + X·N^−x + Y·D^−y + Z·exp(−z·T/μ_rec)   docs/parcae.md §3 C6

The unified law, precisely: a model of N = N(μ_rec) unrolled parameters
(ParameterCount.unrolled(μ_rec)) trained on D tokens at mean recurrence μ_rec and
evaluated at test-time depth T has loss E + X·N^−x + Y·D^−y + Z·exp(−z·T/μ_rec).
Assumptions: Z and z are shared by all models (test-time depth helps every model
alike once measured in units of its training recurrence), and E + X·N^−x + Y·D^−y is
the floor L∞(N, D) as T → ∞, not the loss at T = μ_rec; the two differ by Z·e^−z,
small when L∞ ≈ L(T = μ_rec) as the paper reports (within 0.6%).

The fit (Besiroglu et al. 2024's refit of Chinchilla): minimise the Huber loss
(δ = 1e-3) of the log residuals, Σ_i huber_δ(log L̂_i − log L_i), from a grid of
starts; percentile-bootstrap intervals refit resampled points. Errors are mean
|L̂/L − 1| over the fitted points (in-sample) and over held-out points.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from stabilitylab.analysis.huber_fit import fit_starts, huber_objective, refit

Feature = Callable[[Mapping[str, np.ndarray]], np.ndarray]

# Start grids of Besiroglu et al. for Chinchilla: e ∈ {−1, −.5, …, 1}, a, b ∈ {0, 5, …, 25},
# α, β ∈ {0, .5, …, 2}; the test-time grids cover losses of a few nats and decays over ~1-30 steps.
CONSTANT_GRID = tuple(np.linspace(-1, 1, 5))
SIZE_COEFFICIENT_GRID = tuple(np.arange(0.0, 26.0, 5.0))
SIZE_EXPONENT_GRID = tuple(np.linspace(0, 2, 5))
DEPTH_COEFFICIENT_GRID = (-3.0, -1.5, 0.0, 1.5, 3.0)
DEPTH_RATE_GRID = (0.1, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Term:
    """One summand C·exp(−s·g(x)) of a law, fitted as exp(c − s·g(x)) with c = log C.

    A term without `exponent` is the constant C."""

    coefficient: str  # reported name of C
    exponent: str | None = None  # reported name of s
    feature: Feature | None = None  # g(x) from the law's inputs
    coefficient_grid: tuple[float, ...] = CONSTANT_GRID  # starts for c = log C
    exponent_grid: tuple[float, ...] = ()  # starts for s


@dataclass(frozen=True)
class Law:
    """A scaling law: its inputs, its terms and the domain of each input."""

    name: str
    formula: str
    inputs: tuple[str, ...]
    terms: tuple[Term, ...]
    positive: tuple[str, ...] = ()  # inputs that must be > 0 (their logs are features)
    nonnegative: tuple[str, ...] = ()

    @property
    def params(self) -> tuple[str, ...]:
        """Reported parameter names, in the order of θ."""
        names = [t.coefficient for t in self.terms] + [t.exponent for t in self.terms if t.exponent]
        return tuple(names)

    @property
    def log_params(self) -> tuple[str, ...]:
        """The coefficients: fitted as logs, reported as exp(θ)."""
        return tuple(t.coefficient for t in self.terms)

    def design(self, x: Mapping[str, np.ndarray]) -> np.ndarray:
        """J of shape (n, K, P): u = J θ, the exponents of the K terms at n points."""
        n = len(next(iter(x.values())))
        J = np.zeros((n, len(self.terms), len(self.params)))
        index = {name: i for i, name in enumerate(self.params)}
        for k, term in enumerate(self.terms):
            J[:, k, index[term.coefficient]] = 1.0
            if term.exponent:
                J[:, k, index[term.exponent]] = -term.feature(x)
        return J

    def start_grid(self) -> np.ndarray:
        """Every combination of the terms' start grids, as rows of θ."""
        grids = [t.coefficient_grid for t in self.terms] + [t.exponent_grid for t in self.terms if t.exponent]
        return np.array(list(itertools.product(*grids)), dtype=float)


def _log_of(name: str) -> Feature:
    return lambda x: np.log(x[name])


def _size_terms(exponents: tuple[str, str, str, str]) -> tuple[Term, Term]:
    n_coef, n_exp, d_coef, d_exp = exponents
    return (Term(n_coef, n_exp, _log_of("N"), SIZE_COEFFICIENT_GRID, SIZE_EXPONENT_GRID),
            Term(d_coef, d_exp, _log_of("D"), SIZE_COEFFICIENT_GRID, SIZE_EXPONENT_GRID))


def _depth_term(feature: Feature) -> Term:
    return Term("Z", "z", feature, DEPTH_COEFFICIENT_GRID, DEPTH_RATE_GRID)


CHINCHILLA = Law("chinchilla", "L = E + A/N^alpha + B/D^beta", ("N", "D"),
                 (Term("E"), *_size_terms(("A", "alpha", "B", "beta"))), positive=("N", "D"))
TRAINING = Law("training", "L = E + X*N^-x + Y*D^-y", ("N", "D"),
               (Term("E"), *_size_terms(("X", "x", "Y", "y"))), positive=("N", "D"))
TEST_TIME_FORMS: dict[str, Law] = {
    "exp": Law("test-time exp", "L = L_inf + Z*exp(-z*T)", ("T",),
               (Term("L_inf"), _depth_term(lambda x: x["T"])), nonnegative=("T",)),
    "power1p": Law("test-time power1p", "L = L_inf + Z*(1+T)^-z", ("T",),
                   (Term("L_inf"), _depth_term(lambda x: np.log1p(x["T"]))), nonnegative=("T",)),
    "power": Law("test-time power", "L = L_inf + Z*T^-z", ("T",),
                 (Term("L_inf"), _depth_term(_log_of("T"))), positive=("T",)),
    "pure-power": Law("test-time pure-power", "L = Z*T^-z", ("T",),
                      (_depth_term(_log_of("T")),), positive=("T",)),
}
UNIFIED = Law("unified", "L = E + X*N^-x + Y*D^-y + Z*exp(-z*T/mu_rec)", ("N", "D", "T", "mu_rec"),
              (Term("E"), *_size_terms(("X", "x", "Y", "y")), _depth_term(lambda x: x["T"] / x["mu_rec"])),
              positive=("N", "D", "mu_rec"), nonnegative=("T",))


# ---- inputs ---------------------------------------------------------------------------------

def _column(name: str, values: Any, n: int | None = None) -> np.ndarray:
    """A finite 1-D float array (a scalar is repeated n times)."""
    try:
        a = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: cannot be read as numbers ({err}); pass an array, list or Series") from None
    if a.ndim == 0 and n is not None:
        a = np.full(n, float(a))
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D series, got shape {a.shape}; pass one value per point")
    if n is not None and len(a) != n:
        raise ValueError(f"{name}: has {len(a)} values but L has {n}; pass one value per point")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(f"{name}: {bad.size} values are NaN or infinite (first at index {bad[0]}: {a[bad[0]]}); "
                         f"drop or fix those points")
    return a


def _check_domain(law: Law, x: Mapping[str, np.ndarray]) -> None:
    for names, ok, bound in ((law.positive, lambda a: a > 0, "> 0"),
                             (law.nonnegative, lambda a: a >= 0, "≥ 0")):
        for name in names:
            bad = np.flatnonzero(~ok(x[name]))
            if bad.size:
                raise ValueError(f"{name}: must be {bound} for the {law.name} law, got {x[name][bad[0]]} at "
                                 f"index {bad[0]}; pass raw values (counts, depths), not their logs")


def _inputs(law: Law, columns: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    x = {name: _column(name, columns[name], n) for name in law.inputs}
    _check_domain(law, x)
    return x


def _bind(names: Sequence[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Positional and keyword arguments → {name: value} for exactly `names`."""
    if len(args) > len(names):
        raise TypeError(f"expected at most {len(names)} positional arguments ({', '.join(names)}), got {len(args)}")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names or key in bound:
            raise TypeError(f"unexpected or repeated argument {key!r}; expected {', '.join(names)}")
        bound[key] = value
    missing = [name for name in names if name not in bound]
    if missing:
        raise TypeError(f"missing {', '.join(missing)}; expected {', '.join(names)}")
    return bound


# ---- results --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fit:
    """A fitted law. `params` and `intervals` use the law's names (E, A, alpha, ...);
    `huber` is the final objective Σ_i huber_δ(log L̂_i − log L_i) over the fitted points."""

    law: Law
    theta: np.ndarray = field(repr=False)  # fitted θ (coefficients as logs)
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]  # percentile bootstrap; empty without bootstrap
    huber: float
    in_sample_error: float  # mean |L̂/L − 1| over the fitted points
    held_out_error: float | None  # the same over the held-out points; None without any
    n_points: int  # points fitted

    @classmethod
    def from_params(cls, law: Law, **params: float) -> "Fit":
        """The law at given parameters (e.g. published ones), fitted to nothing."""
        if set(params) != set(law.params):
            raise ValueError(f"params: the {law.name} law takes exactly {', '.join(law.params)}, "
                             f"got {', '.join(params) or 'none'}")
        bad = [name for name in law.log_params if not params[name] > 0]
        if bad:
            raise ValueError(f"{bad[0]}: coefficients must be > 0, got {params[bad[0]]}")
        theta = np.array([np.log(params[p]) if p in law.log_params else float(params[p]) for p in law.params])
        return cls(law=law, theta=theta, params={p: float(params[p]) for p in law.params}, intervals={},
                   huber=np.nan, in_sample_error=np.nan, held_out_error=None, n_points=0)

    def predict(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """L̂ at the given inputs, in the order of the law's inputs (or by name)."""
        bound = _bind(self.law.inputs, args, kwargs)
        n = max(np.size(v) for v in bound.values())
        x = {name: _column(name, bound[name], n) for name in self.law.inputs}
        _check_domain(self.law, x)
        return _predict(self.law, self.theta, x)

    def error(self, *args: Any, **kwargs: Any) -> float:
        """Mean |L̂/L − 1| on other points: the law's inputs, then L (or by name)."""
        bound = _bind((*self.law.inputs, "L"), args, kwargs)
        L = _column("L", bound.pop("L"))
        return float(np.mean(np.abs(self.predict(**bound) / L - 1)))

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for a JSON document (a run's result, a lab's fit file)."""
        return {"law": self.law.name, "formula": self.law.formula, "params": self.params,
                "intervals": {name: list(bounds) for name, bounds in self.intervals.items()},
                "huber": self.huber, "in_sample_error": self.in_sample_error,
                "held_out_error": self.held_out_error, "n_points": self.n_points}

    def table(self) -> str:
        """The parameters with their intervals, one per line."""
        lines = [f"{self.law.formula}  ({self.n_points} points, huber {self.huber:.6g})"]
        for name, value in self.params.items():
            interval = "[{:.6g}, {:.6g}]".format(*self.intervals[name]) if name in self.intervals else ""
            lines.append(f"  {name:>6} = {value:<12.6g} {interval}".rstrip())
        lines.append(f"  in-sample error {100 * self.in_sample_error:.3f}%")
        if self.held_out_error is not None:
            lines.append(f"  held-out error  {100 * self.held_out_error:.3f}%")
        return "\n".join(lines)


def _predict(law: Law, theta: np.ndarray, x: Mapping[str, np.ndarray]) -> np.ndarray:
    u = law.design(x) @ theta
    top = u.max(axis=-1)
    return np.exp(top) * np.exp(u - top[:, None]).sum(axis=-1)


def _report(law: Law, theta: np.ndarray) -> np.ndarray:
    """θ (coefficients as logs) → reported parameters, along the last axis."""
    out = np.array(theta, dtype=float)
    for i, name in enumerate(law.params):
        if name in law.log_params:
            out[..., i] = np.exp(out[..., i])
    return out


# ---- fitting --------------------------------------------------------------------------------

def fit_law(law: Law, L: Any, *, holdout: Any = None, bootstrap: int = 100, level: float = 0.95,
            max_starts: int = 5000, delta: float = 1e-3, seed: int = 0, **columns: Any) -> Fit:
    """Fit `law` to losses L at the inputs `columns` (N=..., D=..., T=..., mu_rec=...).

    holdout: boolean mask of points left out of the fit; their error is `held_out_error`.
    bootstrap: resamples of the fitted points for the intervals (0: none); level: their coverage.
    max_starts: the start grid is used whole up to this size, else a seeded random subset.
    delta: the Huber threshold on log residuals. seed: the start subset and the resamples.
    """
    for name, value, ok, fix in (("bootstrap", bootstrap, bootstrap >= 0, "use 0 for no intervals"),
                                 ("level", level, 0 < level < 1, "e.g. 0.95"),
                                 ("max_starts", max_starts, max_starts >= 1, "use at least 1"),
                                 ("delta", delta, delta > 0, "Besiroglu et al. use 1e-3")):
        if not ok:
            raise ValueError(f"{name}: {value!r} is out of range; {fix}")
    L = _column("L", L)
    if np.any(L <= 0):
        i = int(np.flatnonzero(L <= 0)[0])
        raise ValueError(f"L: losses must be > 0 (they are fitted in log space), got {L[i]} at index {i}")
    x = _inputs(law, _bind(law.inputs, (), columns), len(L))
    held = np.zeros(len(L), bool) if holdout is None else np.asarray(holdout)
    if held.dtype != bool or held.shape != L.shape:
        raise ValueError(f"holdout: expected a boolean mask of {len(L)} values, got {held.dtype} of shape "
                         f"{held.shape}; e.g. holdout=T > mu_rec")
    train = ~held
    n, P = int(train.sum()), len(law.params)
    if n < P:
        raise ValueError(f"L: {n} points to fit but the {law.name} law has {P} parameters "
                         f"({', '.join(law.params)}); give at least {P} points")

    rng = np.random.default_rng(seed)
    starts = law.start_grid()
    if len(starts) > max_starts:
        starts = starts[rng.choice(len(starts), max_starts, replace=False)]
    J, logL = law.design({k: v[train] for k, v in x.items()}), np.log(L[train])
    best, finalists = fit_starts(J, logL, starts, delta)

    intervals: dict[str, tuple[float, float]] = {}
    if bootstrap:
        counts = rng.multinomial(n, np.full(n, 1 / n), size=bootstrap)
        thetas = _report(law, refit(J, logL, finalists, delta, counts))
        lo, hi = np.quantile(thetas, [(1 - level) / 2, (1 + level) / 2], axis=0)
        intervals = {name: (float(a), float(b)) for name, a, b in zip(law.params, lo, hi)}

    def error(mask: np.ndarray) -> float:
        return float(np.mean(np.abs(_predict(law, best, {k: v[mask] for k, v in x.items()}) / L[mask] - 1)))

    return Fit(law=law, theta=best, params=dict(zip(law.params, map(float, _report(law, best)))),
               intervals=intervals, huber=float(huber_objective(J, logL, best, delta)),
               in_sample_error=error(train), held_out_error=error(held) if held.any() else None, n_points=n)


def fit_chinchilla(N: Any, D: Any, L: Any, **options: Any) -> Fit:
    """L = E + A/N^α + B/D^β; params E, A, B, alpha, beta. Options: see fit_law."""
    return fit_law(CHINCHILLA, L, N=N, D=D, **options)


def fit_training(N: Any, D: Any, L: Any, **options: Any) -> Fit:
    """L = E + X·N^−x + Y·D^−y with N = N(μ_rec) the unrolled parameter count
    (ParameterCount.unrolled(μ_rec)); params E, X, x, Y, y."""
    return fit_law(TRAINING, L, N=N, D=D, **options)


def fit_test_time(T: Any, L: Any, form: str = "exp", **options: Any) -> Fit:
    """L(T) at test-time depths T in one of TEST_TIME_FORMS; params L_inf, Z, z (Z, z for pure-power)."""
    if form not in TEST_TIME_FORMS:
        raise ValueError(f"form: {form!r} is not a test-time law; choose one of {', '.join(TEST_TIME_FORMS)}")
    return fit_law(TEST_TIME_FORMS[form], L, T=T, **options)


def fit_unified(N: Any, D: Any, T: Any, mu_rec: Any, L: Any, **options: Any) -> Fit:
    """L = E + X·N^−x + Y·D^−y + Z·exp(−z·T/μ_rec) (module docstring); params E, X, x, Y, y, Z, z.
    mu_rec may be a scalar when every model shares it."""
    return fit_law(UNIFIED, L, N=N, D=D, T=T, mu_rec=mu_rec, **options)


def fit_test_time_forms(T: Any, L: Any, mu_rec: float, **options: Any) -> dict[str, Fit]:
    """Every test-time form fitted on T ≤ μ_rec: `held_out_error` is the extrapolation
    error on T > μ_rec (docs/parcae.md §3 C5)."""
    T = _column("T", T)
    return {form: fit_test_time(T, L, form, holdout=T > mu_rec, **options) for form in TEST_TIME_FORMS}


# ---- compute-optimal allocation -------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    """Loss-minimising μ_rec and D per FLOP budget C, and the log-log slopes over C:
    μ_rec* ∝ C^gamma_mu, D* ∝ C^gamma_D (the paper reports 0.40 and 0.78)."""

    C: np.ndarray
    mu_rec: np.ndarray
    N: np.ndarray  # N(μ_rec*)
    D: np.ndarray
    L: np.ndarray
    gamma_mu: float
    gamma_D: float


def optimal_allocation(fit: Fit, C: Any, params: Any, flops_per_token: Callable[[float], float] | None = None,
                       mu_range: tuple[float, float] = (1.0, 1e4)) -> Allocation:
    """For each budget C, the μ_rec minimising L(N(μ), D) with D = C / flops_per_token(μ).

    A fixed architecture: `params` has `.unrolled(μ)` = N_static + μ·N_core
    (stabilitylab.model.flops.ParameterCount). By default flops_per_token(μ) = 6·N(μ), and
    then, setting dL/dN = 0 in E + X·N^−x + Y·(6N/C)^y, the optimum is closed-form:

        N* = G·(C/6)^(y/(x+y)),   D* = G^−1·(C/6)^(x/(x+y)),   G = (x·X / (y·Y))^(1/(x+y)),
        μ* = (N* − N_static) / N_core

    so D* is an exact power law, μ* only where N_static ≪ μ*·N_core; the slopes reported
    are least-squares fits of log μ*, log D* on log C. Any other FLOP count (e.g.
    training_flops_per_token(cfg, seq_len, n, k).total) is minimised numerically over
    log μ in `mu_range`, which also bounds the default case.
    """
    if tuple(fit.law.inputs) != ("N", "D"):
        raise ValueError(f"fit: needs a training-law fit of N and D (training or chinchilla), got the "
                         f"{fit.law.name} law; use fit_training(N, D, L)")
    C = _column("C", np.atleast_1d(C))
    if np.any(C <= 0) or len(C) < 2:
        raise ValueError("C: give at least two positive FLOP budgets (the slopes need a range)")
    flops = flops_per_token or (lambda mu: 6.0 * params.unrolled(mu))
    lo, hi = np.log(mu_range[0]), np.log(mu_range[1])

    def loss(log_mu: float, budget: float) -> float:
        mu = np.exp(log_mu)
        return float(fit.predict(params.unrolled(mu), budget / flops(mu))[0])

    mu = np.array([np.exp(minimize_scalar(loss, bounds=(lo, hi), args=(c,), method="bounded",
                                          options={"xatol": 1e-10}).x) for c in C])
    N = np.array([params.unrolled(m) for m in mu])
    D = C / np.array([flops(m) for m in mu])
    gamma_mu, gamma_D = (float(np.polyfit(np.log(C), np.log(v), 1)[0]) for v in (mu, D))
    return Allocation(C=C, mu_rec=mu, N=N, D=D, L=fit.predict(N, D), gamma_mu=gamma_mu, gamma_D=gamma_D)
