"""Loss spikes, divergence and its early warning, from a run's history.

Everything here reads plain series (pandas, indexed by training step), so it works on any
run: one of this lab's (`History.from_run`), an old one, or numbers from elsewhere.

Spikes (the trainer's rule; `SpikeDetector` is the one implementation, the trainer's
DivergenceMonitor uses it step by step and `find_spikes` runs it over a series):

    spike at step s   ⇔  loss_s finite and loss_s > median(W) + k · MAD(W)
                         W = the last `window` finite losses before s,  MAD = median |x − median(W)|

Divergence (the trainer's rules, `step_verdict`; `find_divergence` = first step they fire):

    non-finite loss or gradient norm        terminal
    max per-token ‖h_T‖ > max_state_norm     a bound (a NaN norm counts as crossing it)
    loss > max_loss                          a bound

Early warning: signals, each a series over the steps where it was measured, and a
threshold. A signal fires at the first step where its condition has held on `patience`
consecutive measurements (the step of the last one: when it could have been known). A
non-finite value (an overflowed state or spectrum) always satisfies the condition.

    rho          ρ(Ā) ≥ rho               (spectra)    the linear loop h ← Āh + B̄e is not
                                                       contracting: the paper's stability test
    jacobian     ρ(∂F/∂h at h_T) ≥ jacobian  (analysis "jacobian_radius")  the nonlinear loop
                                                       expands near where it ends
    lyapunov     λ₁ > lyapunov            (analysis "lyapunov")  nearby orbits separate
    loop_rate    q ≥ rate, q = (δ_T / δ_m)^(1/(T−m)) the loop's contraction rate over the
                 second half (m = ⌈T/2⌉) of the probe trace, δ_t = ‖h_t − h_{t−1}‖ (`loop_rate`);
                 q → ρ(Ā) for a linear loop, the leading Jacobian modulus for the real one.
                 Not the norm ratio ‖h_T‖/‖h_{T−1}‖: a loop contracting slowly towards a large
                 fixed point grows too (measured: free-diagonal, ρ(Ā) = 0.55, T = 6: ratio
                 1.017, q = 0.54). A loop that has settled (δ_T < settled · ‖h_T‖) does not fire.
    state_trend  the per-step max ‖h_T‖ (scalar "h_T_norm"), extrapolated: the least-squares
                 slope b of log ‖h_T‖ over the last `trend_window` steps and the steps left to
                 the divergence bound, τ = (log max_state_norm − log ‖h_T‖_s) / b (∞ if b ≤ 0);
                 fires when τ ≤ horizon. A nowcast: its lead is at most about `horizon`.
    radius_trend, rate_trend, rho_trend, loop_level and forecast: the every-step signals and
                 the combined warning (`forecast_signals`, analysis/forecast.py):

    forecast     median of the last 20 ρ̂(∂F/∂h) > 1   OR   state_trend on 2 steps in a row

The run's warning ("any") is the earliest signal to fire; `forecast` is the one meant to be
left switched on. Against the divergence step d (if any):

    lead = d − warning step  (also in tokens and FLOPs: the cumulative scalars at d minus at w)
    outcome  early  fired at or before d (lead ≥ 0)      late   fired after d
             missed d exists, never fired               false_alarm  fired, no divergence
             quiet  neither                             pending  no divergence yet, and the
                                                        run is not complete (still running, failed)

`warning_table` counts outcomes over runs: recall = early / diverged, precision =
early / fired (pending runs left out) — how far the warning can be trusted (docs/parcae.md, claim C2);
with `censor`, a false alarm near a run's end is counted apart (the run ended too soon to tell).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from stabilitylab.analysis.forecast import held, level_forecast, state_forecast, sustained
from stabilitylab.config import DivergenceConfig, check_numbers, from_dict, number
from stabilitylab.records import (CONTRACTION_RATE, DIVERGENCE, EARLY_WARNING, FLOPS, GRAD_NORM, JACOBIAN_RADIUS, LOSS,
                                  LYAPUNOV, RADIUS_ESTIMATE, RHO, SPIKE, STATE_NORM, TOKENS, TRACE_DELTA_NORM_MEAN,
                                  TRACE_STATE_NORM_MEAN)
from stabilitylab.store import RunWriter, StoreError

SIGNALS = ("rho", "jacobian", "lyapunov", "loop_rate", "state_trend", "radius_trend", "rate_trend", "rho_trend",
           "loop_level", "forecast")
OUTCOMES = ("early", "late", "missed", "false_alarm", "quiet", "pending")
EVENTS_RESULT = "events"  # the run's result where `write_events` keeps the report
HISTORY_SCALARS = (LOSS, GRAD_NORM, STATE_NORM, TOKENS, FLOPS, RADIUS_ESTIMATE, CONTRACTION_RATE)


# ---- spikes ------------------------------------------------------------------------------

class SpikeDetector:
    """Rolling median + k·MAD rule over the last `window` finite losses (window 0: off)."""

    def __init__(self, window: int, k: float):
        if window < 0 or not k > 0:
            raise ValueError(f"spike rule: window must be ≥ 0 and k > 0, got window={window}, k={k}")
        self.k = k
        self.losses: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> str | None:
        """Add a loss; return a description if it is a spike against the window before it.
        A non-finite loss is never a spike (it is divergence) and never enters the window."""
        spike = None
        if math.isfinite(loss) and self.losses.maxlen and len(self.losses) == self.losses.maxlen:
            median = statistics.median(self.losses)
            mad = statistics.median(abs(x - median) for x in self.losses)
            if loss > median + self.k * mad:
                spike = f"loss {loss:.4g} > median {median:.4g} + {self.k:g} × MAD {mad:.3g}"
        if math.isfinite(loss):
            self.losses.append(loss)
        return spike


@dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    detail: str  # the trainer's words for it


def find_spikes(loss: pd.Series, window: int, k: float) -> list[Spike]:
    """The spikes of a loss series (index: step, ascending), exactly as the trainer flags them."""
    detector = SpikeDetector(window, k)
    out = []
    for step, value in loss.items():
        detail = detector.update(float(value))
        if detail:
            out.append(Spike(int(step), float(value), detail))
    return out


# ---- divergence --------------------------------------------------------------------------

RULE_FIELDS = ("max_loss", "max_state_norm", "spike_window", "spike_k")  # what the rules below read


def run_divergence_config(config: Mapping[str, Any]) -> DivergenceConfig:
    """The DivergenceConfig a run was trained under, from its config dict ([divergence]). A run
    whose record lacks one of RULE_FIELDS is refused rather than judged by today's defaults."""
    table = config.get("divergence", {})
    missing = [name for name in RULE_FIELDS if name not in table]
    if missing:
        raise ValueError(f"the run's config has no divergence.{missing[0]}; pass DivergenceConfig(...) "
                         "with the bounds it was trained under")
    return from_dict(DivergenceConfig, table, section="divergence")


def step_verdict(loss: float, grad_norm: float | None, state_norm: float | None, max_loss: float,
                 max_state_norm: float) -> tuple[str | None, dict[str, str]]:
    """One step's verdict: (the terminal reason or None, {bound: detail} of the bounds crossed,
    max_state_norm before max_loss). None for a norm not recorded skips its rule."""
    if not math.isfinite(loss):
        return f"loss is {loss}", {}
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}", {}
    crossed = {}
    if state_norm is not None and not state_norm <= max_state_norm:
        crossed["max_state_norm"] = f"‖h_T‖ {state_norm:.4g} > max_state_norm {max_state_norm:g}"
    if loss > max_loss:
        crossed["max_loss"] = f"loss {loss:.4g} > max_loss {max_loss:g}"
    return None, crossed


@dataclass(frozen=True)
class Divergence:
    step: int
    rule: str  # non_finite, max_state_norm or max_loss
    detail: str  # the trainer's words for it


def find_divergence(scalars: Mapping[str, pd.Series], limits: DivergenceConfig) -> Divergence | None:
    """The first step at which the trainer's rules fire on recorded scalars: loss, and
    grad_norm and h_T_norm where recorded (series indexed by step)."""
    grad, state = scalars.get(GRAD_NORM, _empty()), scalars.get(STATE_NORM, _empty())
    for step, loss in scalars[LOSS].items():
        terminal, crossed = step_verdict(float(loss), _at(grad, step), _at(state, step), limits.max_loss,
                                         limits.max_state_norm)
        if terminal:
            return Divergence(int(step), "non_finite", terminal)
        if crossed:
            rule, detail = next(iter(crossed.items()))
            return Divergence(int(step), rule, detail)
    return None


def _empty() -> pd.Series:
    return pd.Series(dtype=float)


def _at(series: pd.Series, step: int) -> float | None:
    return float(series[step]) if step in series.index else None


# ---- the history -------------------------------------------------------------------------

@dataclass
class History:
    """A run's record as series indexed by step (only steps where each was measured):
    scalars by name (HISTORY_SCALARS), ρ(Ā), ρ(∂F/∂h), λ₁, and the probe batch's loop trace:
    mean increments δ_t = ‖h_t − h_{t−1}‖ and mean norms ‖h_t‖ over iterations t = 1..T."""

    scalars: dict[str, pd.Series]
    rho: pd.Series = field(default_factory=_empty)
    jacobian_radius: pd.Series = field(default_factory=_empty)
    lyapunov: pd.Series = field(default_factory=_empty)
    increments: pd.DataFrame = field(default_factory=pd.DataFrame)  # loop trace: δ_t, row = step, column = t
    norms: pd.DataFrame = field(default_factory=pd.DataFrame)  # loop trace: ‖h_t‖, the same shape

    def __post_init__(self) -> None:
        if LOSS not in self.scalars:
            raise ValueError(f"history: no {LOSS!r} series; spikes and divergence are read from it")

    @classmethod
    def from_run(cls, run: Any) -> "History":
        """Read a store Run (anything with its scalars/spectra/traces/analysis readers)."""
        long = run.scalars(HISTORY_SCALARS)
        scalars = {name: pd.Series(g["value"].to_numpy(), index=g["step"].to_numpy())
                   for name, g in long.groupby("name")}
        if LOSS not in scalars:
            raise ValueError(f"{run.path}: the run recorded no loss yet")
        spectra = run.spectra()
        traces = run.traces([TRACE_DELTA_NORM_MEAN, TRACE_STATE_NORM_MEAN])
        analysis = run.analysis()

        def largest(name: str) -> pd.Series:  # ρ(∂F/∂h) is one number, λ₁ the largest exponent
            rows = analysis[analysis["name"] == name]
            return pd.Series([float(np.max(v)) for v in rows["values"]], index=rows["step"].to_numpy(), dtype=float)

        return cls(scalars=scalars, rho=pd.Series(spectra[RHO].to_numpy(), index=spectra["step"].to_numpy()),
                   jacobian_radius=largest(JACOBIAN_RADIUS), lyapunov=largest(LYAPUNOV),
                   increments=_frame(traces.get(TRACE_DELTA_NORM_MEAN)), norms=_frame(traces.get(TRACE_STATE_NORM_MEAN)))


def _frame(trace: Any) -> pd.DataFrame:
    """A store Trace (steps, values (S, T)) as a frame: row = step, column = iteration t."""
    if trace is None:
        return pd.DataFrame()
    return pd.DataFrame(trace.values, index=trace.steps, columns=range(1, trace.values.shape[1] + 1))


def loop_rate(delta: np.ndarray, norm: np.ndarray, settled: float) -> np.ndarray:
    """The loop's contraction rate per row of a trace (S, T) of mean increments
    δ_t = ‖h_t − h_{t−1}‖ and mean norms ‖h_t‖, over the second half of the iterations:

        q = (δ_T / δ_m)^(1 / (T − m)),   m = ⌈T/2⌉

    For h ← Āh + b the increments obey δ_{t+1} = Āδ_t, so q → ρ(Ā); for the nonlinear loop
    q estimates the leading Jacobian modulus along the orbit (power iteration, for free).
    q < 1: contracting. Rows whose last step moved the state by less than `settled` · ‖h_T‖
    have converged, and their ratio would be rounding noise: q = 0 there. A non-finite
    δ or norm (the loop overflowed) gives q = inf."""
    delta, norm = np.asarray(delta, dtype=float), np.asarray(norm, dtype=float)
    if delta.shape != norm.shape or delta.ndim != 2 or delta.shape[1] < 2:
        raise ValueError(f"loop traces of equal shape (steps, iterations ≥ 2) are needed, got {delta.shape} "
                         f"and {norm.shape}")
    T = delta.shape[1]
    m = (T + 1) // 2
    last, mid, size = delta[:, -1], delta[:, m - 1], norm[:, -1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = (last / mid) ** (1.0 / (T - m))
    overflow = ~(np.isfinite(last) & np.isfinite(mid) & np.isfinite(size))
    return np.where(overflow, np.inf, np.where(last >= settled * size, np.nan_to_num(q, posinf=np.inf), 0.0))


# ---- early warning -----------------------------------------------------------------------

@dataclass(frozen=True)
class WarningRules:
    """Thresholds of the early-warning signals (module docstring). Defaults and why:
    rho = jacobian = rate = 1 and lyapunov = 0 are the stability boundaries themselves;
    settled = 1e-3 is far above float32 rounding of a converged loop (~1e-7); state_trend
    looks `horizon` = 5 steps ahead from a `trend_window` = 5 step slope; `patience` = 1
    because probes are deterministic (fixed batch and h_0) and sparse: waiting for a
    second one costs a whole probe period of lead."""

    rho: float = number(1.0, "(0, inf]")
    jacobian: float = number(1.0, "(0, inf]")
    lyapunov: float = 0.0  # any finite λ₁ threshold (the rule: finite)
    rate: float = number(1.0, "(0, inf]")
    settled: float = number(1e-3, "[0, inf)")
    horizon: float = number(5.0, "[0, inf]")
    trend_window: int = number(5, "[2, inf)")
    patience: int = number(1, "[1, inf)")
    # the trend signals (`forecast_signals`): level 1 is the stability boundary; start 50 is fixed
    # beforehand (past the init's transient: tuned, 0 wins by firing at step 12 from it); window,
    # horizon and patience chosen on the first, 250-step c2_late_divergence (docs/analysis.md)
    forecast_level: float = number(1.0, "(0, inf)")
    forecast_window: int = number(10, "[2, inf)")
    forecast_horizon: float = number(50.0, "[0, inf]")
    forecast_patience: int = number(3, "[1, inf)")
    forecast_start: int = number(50, "[0, inf)")  # no trend fires before this step: the init's transient is no forecast
    # the combined warning (`forecast`): the loop's radius, its median over loop_window steps
    # above loop_level on loop_patience steps in a row, or the state_trend nowcast on
    # nowcast_patience steps in a row. loop_level 1 is the boundary itself, fixed; window and
    # patiences chosen by experiments/score_warnings.py on c2_late_divergence seeds 0, 1
    # (docs/analysis.md, "The combined warning")
    loop_level: float = number(1.0, "(0, inf)")
    loop_window: int = number(20, "[1, inf)")
    loop_patience: int = number(1, "[1, inf)")
    nowcast_patience: int = number(2, "[1, inf)")

    def __post_init__(self) -> None:
        check_numbers(self)  # config/base.py: finite unless a bound says inf, inside the interval


@dataclass(frozen=True)
class EarlyWarning:
    """One signal's first firing and its lead before the divergence (None: no divergence)."""

    signal: str
    step: int
    value: float
    detail: str
    lead_steps: int | None
    lead_tokens: float | None
    lead_flops: float | None
    outcome: str  # early, late, false_alarm or pending


def forecast_signals(history: History, rules: WarningRules, bound: float
                     ) -> dict[str, tuple[pd.Series, np.ndarray, str]]:
    """The forecasting signals (docs/analysis.md, "The combined warning"), each (values, fires, text):

    radius_trend  τ of the every-step Jacobian radius estimate ρ̂ (scalar jacobian_radius_est)
                  reaching `forecast_level` ≤ forecast_horizon, for forecast_patience steps
    rate_trend    the same for the every-step contraction rate of the training forward's trace
    rho_trend     the same for ρ(Ā) (spectra; sparse steps are fine)
    loop_level    the loop expands and stays so: m = the median of the radius (ρ̂; ρ(Ā) where
                  no estimate was recorded, held between its measurements) over the last
                  loop_window steps > loop_level, on loop_patience steps in a row
    forecast      the combined warning: loop_level OR the state_trend nowcast held on
                  nowcast_patience steps in a row.

    Why this combination (measured on c2_late_divergence, docs/analysis.md): a loop that has
    stopped contracting breaks tens of steps later (concat: 16–46 steps after m passes 1),
    while a healthy loop's ρ̂ wanders up to ~1 and back (free-diagonal); the median keeps one
    noisy estimate from firing, and "> 1", not "≥ 1", leaves out a loop that is exactly
    marginal (add's Ā = I: ‖h_T‖ grows linearly, not exponentially). A run can also break
    with its loop contracting (the weights around the loop blow up at a high learning rate:
    stable-dense at 0.48, ρ̂ ≈ 0.1); only ‖h_T‖ shows that, a few steps ahead: the nowcast,
    asked to hold for nowcast_patience steps so that one jump of ‖h_T‖ in a healthy run does
    not fire (a state already at the bound, τ = 0, fires at once: that is the divergence).
    The trend signals do not enter: a straight line through ρ̂ fires on the healthy runs whose
    ρ̂ climbs and levels off below 1. No trend fires before forecast_start: the first steps'
    rise from the init is a transient that a line extrapolates into a false forecast."""
    out: dict[str, tuple[pd.Series, np.ndarray, str]] = {}
    level, window, horizon = rules.forecast_level, rules.forecast_window, rules.forecast_horizon
    named = {"radius_trend": (history.scalars.get(RADIUS_ESTIMATE), "ρ̂(∂F/∂h)"),
             "rate_trend": (history.scalars.get(CONTRACTION_RATE), "q"), "rho_trend": (history.rho, "ρ(Ā)")}
    for name, (series, label) in named.items():
        if series is None or not len(series):
            continue
        tau = level_forecast(series.sort_index(), level, window)
        started = tau.index.to_numpy() >= rules.forecast_start
        out[name] = (tau, held((tau.to_numpy() <= horizon) & started, rules.forecast_patience),
                     f"{label} trend reaches {level:g} in {{:.3g}} steps (≤ {horizon:g})")
    radius, label = history.scalars.get(RADIUS_ESTIMATE), "ρ̂(∂F/∂h)"
    if radius is None or not len(radius):
        radius, label = history.rho, "ρ(Ā)"
    if not len(radius):
        return out
    median, expands = sustained(radius.sort_index(), rules.loop_level, rules.loop_window, rules.loop_patience)
    out["loop_level"] = (median, expands, f"median {label} over {rules.loop_window} steps = {{:.4g}} > "
                                          f"{rules.loop_level:g}" + (f" on {rules.loop_patience} in a row"
                                                                     if rules.loop_patience > 1 else ""))
    h_norm = history.scalars.get(STATE_NORM)
    if h_norm is not None and len(h_norm) and math.isfinite(bound):
        nowcast = state_forecast(h_norm.sort_index(), bound, rules.trend_window)
        steps = median.index.union(nowcast.index)
        m = median.reindex(steps, method="ffill")  # ρ(Ā) is sparse: hold its last median
        fires = (pd.Series(expands, index=median.index).reindex(steps, method="ffill").fillna(False).to_numpy(bool)
                 | pd.Series(held(nowcast.to_numpy() <= rules.horizon, rules.nowcast_patience)
                             | (nowcast.to_numpy() == 0), index=nowcast.index).reindex(steps).fillna(False).to_numpy(bool))
        out["forecast"] = (m, fires, f"median {label} = {{:.4g}}: > {rules.loop_level:g}, or ‖h_T‖ reaches "
                                     f"max_state_norm within {rules.horizon:g} steps on {rules.nowcast_patience} in a row")
    return out


def _signals(history: History, rules: WarningRules, bound: float) -> dict[str, tuple[pd.Series, np.ndarray, str]]:
    """signal → (values, whether each satisfies its condition, a format for the detail)."""
    def at_least(s: pd.Series, t: float) -> np.ndarray:
        v = s.to_numpy(dtype=float)
        return ~np.isfinite(v) | (v >= t)

    out = {
        "rho": (history.rho, at_least(history.rho, rules.rho), f"ρ(Ā) = {{:.4g}} ≥ {rules.rho:g}"),
        "jacobian": (history.jacobian_radius, at_least(history.jacobian_radius, rules.jacobian),
                     f"ρ(∂F/∂h) = {{:.4g}} ≥ {rules.jacobian:g}"),
        "lyapunov": (history.lyapunov, ~np.isfinite(history.lyapunov.to_numpy(dtype=float))
                     | (history.lyapunov.to_numpy(dtype=float) > rules.lyapunov), f"λ₁ = {{:.4g}} > {rules.lyapunov:g}"),
    }
    if not history.increments.empty:
        q = pd.Series(loop_rate(history.increments.to_numpy(), history.norms.to_numpy(), rules.settled),
                      index=history.increments.index)
        out["loop_rate"] = (q, at_least(q, rules.rate), f"loop contraction rate q = {{:.4g}} ≥ {rules.rate:g}")
    h_norm = history.scalars.get(STATE_NORM)
    if h_norm is not None and len(h_norm) and math.isfinite(bound):
        tau = state_forecast(h_norm, bound, rules.trend_window)
        out["state_trend"] = (tau, tau.to_numpy() <= rules.horizon,
                              f"‖h_T‖ reaches max_state_norm {bound:g} in {{:.3g}} steps (≤ {rules.horizon:g})")
    out.update(forecast_signals(history, rules, bound))
    return {name: item for name, item in out.items() if len(item[0])}


@dataclass
class RunEvents:
    """What a run's history says: its spikes, its divergence, and each early-warning signal
    that fired (earliest first). `signals` are those that had data to judge."""

    spikes: list[Spike]
    divergence: Divergence | None
    warnings: list[EarlyWarning]
    signals: tuple[str, ...]
    rules: WarningRules
    complete: bool  # the run ended (finished or diverged): silence is then quiet, not pending
    steps: int = 0  # training steps recorded (the loss series' length): the false-alarm rate's denominator
    last_step: int | None = None  # the last step recorded: a false alarm this close to it may be censored

    @property
    def first(self) -> list[EarlyWarning]:
        """The run's warning: the signals that fired first (several on a tie)."""
        return [w for w in self.warnings if w.step == self.warnings[0].step] if self.warnings else []

    def outcomes(self) -> dict[str, str]:
        """Outcome per judged signal, and "any" for the run's warning."""
        fired = {w.signal: w.outcome for w in self.warnings}
        silent = "missed" if self.divergence else "quiet" if self.complete else "pending"
        out = {s: fired.get(s, silent) for s in self.signals}
        out["any"] = self.warnings[0].outcome if self.warnings else silent
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"spikes": [asdict(s) for s in self.spikes],
                "divergence": asdict(self.divergence) if self.divergence else None,
                "warnings": [asdict(w) for w in self.warnings],
                "first_signals": [w.signal for w in self.first], "signals": list(self.signals),
                "outcomes": self.outcomes(), "rules": asdict(self.rules), "complete": self.complete}


def early_warnings(history: History, divergence: Divergence | None, max_state_norm: float,
                   rules: WarningRules = WarningRules(), complete: bool = True
                   ) -> tuple[list[EarlyWarning], tuple[str, ...]]:
    """Each signal's first firing, earliest first, with its lead before `divergence`; and the
    signals that had data. `max_state_norm` is the bound the state_trend forecasts; without a
    divergence a firing is a false alarm if the run is `complete`, else pending."""
    warnings = []
    signals = _signals(history, rules, max_state_norm)
    for name, (values, fires, text) in signals.items():
        first = np.flatnonzero(held(fires, rules.patience))
        if not len(first):
            continue
        i = int(first[0])
        step, value = int(values.index[i]), float(values.iloc[i])
        detail = text.format(value) + (f" for {rules.patience} probes" if rules.patience > 1 else "")
        lead = tokens = flops = None
        outcome = "false_alarm" if complete else "pending"
        if divergence:
            lead = divergence.step - step
            tokens, flops = (_difference(history.scalars.get(n), step, divergence.step) for n in (TOKENS, FLOPS))
            outcome = "early" if lead >= 0 else "late"
        warnings.append(EarlyWarning(name, step, value, detail, lead, tokens, flops, outcome))
    warnings.sort(key=lambda w: (w.step, SIGNALS.index(w.signal)))
    return warnings, tuple(signals)


def _difference(series: pd.Series | None, start: int, stop: int) -> float | None:
    """series[stop] − series[start] of a cumulative scalar (tokens, FLOPs); None if either is missing."""
    if series is None or start not in series.index or stop not in series.index:
        return None
    return float(series[stop] - series[start])


def analyse(history: History, limits: DivergenceConfig, rules: WarningRules = WarningRules(),
            complete: bool = True) -> RunEvents:
    """Spikes, divergence and early warnings of one history (`complete`: the run has ended).
    Spikes are searched as the trainer searches them: a terminal step (non-finite loss or
    gradient) is not checked."""
    divergence = find_divergence(history.scalars, limits)
    loss = history.scalars[LOSS]
    if divergence and divergence.rule == "non_finite":
        loss = loss[loss.index < divergence.step]
    spikes = find_spikes(loss, limits.spike_window, limits.spike_k)
    warnings, signals = early_warnings(history, divergence, limits.max_state_norm, rules, complete)
    return RunEvents(spikes, divergence, warnings, signals, rules, complete, len(history.scalars[LOSS]),
                     int(history.scalars[LOSS].index.max()))


def analyse_run(run: Any, rules: WarningRules = WarningRules()) -> RunEvents:
    """`analyse` on a store Run, under the divergence settings it was trained with; complete
    once its status is finished or diverged. Everything is read from one commit when the
    run offers a snapshot (a live run keeps writing)."""
    with getattr(run, "snapshot", contextlib.nullcontext)():
        complete = run.status()["status"] in ("finished", "diverged")
        history, limits = History.from_run(run), run_divergence_config(run.config())
    return analyse(history, limits, rules, complete)


def analyse_runs(runs: Iterable[Any],
                 rules: WarningRules = WarningRules()) -> tuple[dict[str, RunEvents], dict[str, str]]:
    """`analyse_run` over several runs (a lab): ({run id: its events}, {run id: why it was
    skipped}). A run that cannot be read (StoreError: a damaged database) or has no history
    yet (ValueError: no loss recorded) is skipped, and the others are analysed."""
    reports, skipped = {}, {}
    for run in runs:
        try:
            reports[run.id] = analyse_run(run, rules)
        except (StoreError, ValueError) as err:
            skipped[run.id] = str(err)
    return reports, skipped


def missing_events(recorded: pd.DataFrame, report: RunEvents) -> list[tuple[int, str, str]]:
    """(step, kind, detail) of what `report` found that the run's `recorded` events lack: every
    early warning; a spike or the divergence only at a step where the trainer logged none of
    that kind (what it recorded is its verdict and stays)."""
    have = set(zip(recorded["step"], recorded["kind"], recorded["detail"]))
    kinds_at = set(zip(recorded["step"], recorded["kind"]))
    new = [(w.step, EARLY_WARNING, f"{w.signal}: {w.detail}") for w in report.warnings]
    new += [(s.step, SPIKE, f"{s.detail} (found offline)") for s in report.spikes if (s.step, SPIKE) not in kinds_at]
    d = report.divergence
    if d and (d.step, DIVERGENCE) not in kinds_at:
        new.append((d.step, DIVERGENCE, f"{d.detail} (found offline)"))
    return [e for e in new if e not in have]


def write_events(run: Any, report: RunEvents) -> dict[str, int]:
    """Log the report's events the run lacks (`missing_events`; never touching what is there)
    and save the report as the run's result EVENTS_RESULT. Returns how many of each kind were
    added; a second call adds none."""
    new = missing_events(run.events(), report)
    with RunWriter.attach(run.path) as writer:
        for step, kind, detail in new:
            writer.log_event(step, kind, detail)
        writer.save_result(EVENTS_RESULT, report.to_dict())
    return {k: sum(kind == k for _, kind, _ in new) for k in (EARLY_WARNING, SPIKE, DIVERGENCE)}


def warning_table(reports: Iterable[RunEvents], censor: float | None = None) -> pd.DataFrame:
    """Per signal (and "any"): runs judged, each outcome's count, recall = early / diverged,
    precision = early / fired, and the median lead in steps of the early warnings.

    `censor` (steps): a false alarm raised within `censor` steps of the run's last recorded
    step is counted as "censored" instead, and left out of precision: the run ended before
    the warning's own horizon did, so whether it would have diverged is not known. None: every
    warning in a run that did not diverge is a false alarm (the strict count)."""
    reports = list(reports)
    rows = []
    for signal in (*SIGNALS, "any"):
        judged = [r for r in reports if signal == "any" or signal in r.signals]
        if not judged:
            continue
        firsts = [(r.first[:1] if signal == "any" else [w for w in r.warnings if w.signal == signal]) for r in judged]
        outcomes = [_censored(r, w, r.outcomes()[signal], censor) for r, w in zip(judged, firsts)]
        counts = {o: outcomes.count(o) for o in (*OUTCOMES, "censored")}
        diverged = counts["early"] + counts["late"] + counts["missed"]
        fired = counts["early"] + counts["late"] + counts["false_alarm"]
        leads = [w[0].lead_steps for w in firsts if w and w[0].outcome == "early"]
        rows.append({"signal": signal, "runs": len(judged), **counts,
                     "recall": counts["early"] / diverged if diverged else math.nan,
                     "precision": counts["early"] / fired if fired else math.nan,
                     "median_lead_steps": float(np.median(leads)) if leads else math.nan})
    return pd.DataFrame(rows)


def _censored(report: RunEvents, first: list[EarlyWarning], outcome: str, censor: float | None) -> str:
    """"censored" for a false alarm within `censor` steps of the run's end, else the outcome."""
    if censor is None or outcome != "false_alarm" or report.last_step is None:
        return outcome
    return "censored" if first[0].step > report.last_step - censor else outcome


def warning_scores(reports: Iterable[RunEvents], censor: float | None = None) -> pd.DataFrame:
    """`warning_table` plus what a user needs to leave a warning switched on: the 10th
    percentile of the lead in steps, the median lead in tokens, and false alarms per 1000
    steps of healthy training = false alarms / steps of the runs that did not diverge × 1000
    (a run warns once, so at most one per run). `censor` as in `warning_table`."""
    reports = [r for r in reports if r.complete]
    table = warning_table(reports, censor)
    healthy = sum(r.steps for r in reports if r.divergence is None)
    p10, tokens = [], []
    for signal in table["signal"]:
        early = [w for r in reports for w in (r.first[:1] if signal == "any" else
                                               [w for w in r.warnings if w.signal == signal]) if w.outcome == "early"]
        leads = [w.lead_steps for w in early]
        p10.append(float(np.percentile(leads, 10)) if leads else math.nan)
        lead_tokens = [w.lead_tokens for w in early if w.lead_tokens is not None]
        tokens.append(float(np.median(lead_tokens)) if lead_tokens else math.nan)
    table["p10_lead_steps"] = p10
    table["median_lead_tokens"] = tokens
    table["false_alarms_per_1000_healthy_steps"] = table["false_alarm"] / healthy * 1000 if healthy else math.nan
    return table


__all__ = ["SPIKE", "DIVERGENCE", "EARLY_WARNING", "SIGNALS", "OUTCOMES", "SpikeDetector", "Spike", "find_spikes",
           "RULE_FIELDS", "run_divergence_config", "step_verdict",
           "Divergence", "find_divergence", "History", "loop_rate", "WarningRules", "EarlyWarning",
           "RunEvents", "early_warnings", "analyse", "analyse_run", "analyse_runs", "EVENTS_RESULT",
           "missing_events", "write_events", "warning_table", "forecast_signals", "warning_scores"]
