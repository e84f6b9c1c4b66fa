"""Spikes, divergence and early warning: known answers on synthetic histories, the
trainer and the offline analysis flagging the same steps, properties of the spike rule,
`stabilitylab events` on a store, and a real tiny run that diverges."""

import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stabilitylab.analysis.events import (DIVERGENCE, EARLY_WARNING, SPIKE, History, SpikeDetector,
                                          WarningRules, analyse, analyse_run, find_divergence, find_spikes, loop_rate,
                                          run_divergence_config, state_forecast, warning_table, level_forecast,
                                          warning_scores)
from stabilitylab.cli import main
from stabilitylab.config import DivergenceConfig
from stabilitylab.experiment import load_experiment
from stabilitylab.store import RunWriter, open_run
from stabilitylab.analysis.divergence import DivergenceMonitor
from stabilitylab.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
LIMITS = DivergenceConfig(max_loss=20.0, max_state_norm=1e4, spike_window=50, spike_k=6.0)
TOKENS_PER_STEP, FLOPS_PER_STEP = 256, 1e9


def series(values, start=1, every=1):
    return pd.Series(np.asarray(values, dtype=float), index=np.arange(start, start + every * len(values), every))


def history(loss, h_norm=None, **probes):
    """Scalars of `len(loss)` steps (tokens and FLOPs grow by a fixed amount per step)."""
    steps = np.arange(1, len(loss) + 1)
    scalars = {"loss": series(loss), "tokens": series(steps * TOKENS_PER_STEP),
               "flops": series(steps * FLOPS_PER_STEP)}
    if h_norm is not None:
        scalars["h_T_norm"] = series(h_norm)
    return History(scalars=scalars, **probes)


# ---- known answers -------------------------------------------------------------------------

@given(st.integers(1, 40), st.integers(0, 40))
def test_rho_crossing_one_at_s_warns_d_minus_s_steps_before_a_divergence_at_d(s, gap):
    d = s + gap
    n = d + 10
    rho = series([0.5 if step < s else 1.2 for step in range(1, n + 1)])  # a spectrum every step
    h_norm = [10.0] * (d - 1) + [1e5] * (n - d + 1)  # crosses max_state_norm at step d
    report = analyse(history([3.0] * n, h_norm, rho=rho), LIMITS, WarningRules())
    assert report.divergence.step == d and report.divergence.rule == "max_state_norm"
    rho_warning = next(w for w in report.warnings if w.signal == "rho")
    assert (rho_warning.step, rho_warning.lead_steps, rho_warning.outcome) == (s, d - s, "early")
    assert rho_warning.lead_tokens == (d - s) * TOKENS_PER_STEP and rho_warning.lead_flops == (d - s) * FLOPS_PER_STEP
    assert [w.signal for w in report.first] == ["rho"] + (["state_trend", "forecast"] if s == d else [])
    assert report.outcomes()["any"] == "early"


def test_a_warning_from_sparse_probes_is_dated_at_the_probe_that_saw_it():
    rho = series([0.6, 0.8, 0.95, 1.1, 1.3], start=10, every=10)  # probes at 10, 20, ..., 50
    report = analyse(history([3.0] * 60, [10.0] * 44 + [1e5] * 16, rho=rho), LIMITS)
    (warning,) = [w for w in report.warnings if w.signal == "rho"]
    assert (warning.step, report.divergence.step, warning.lead_steps) == (40, 45, 5)


def test_injected_spikes_are_found_at_their_steps_and_nowhere_else():
    steps = np.arange(1, 301)
    loss = 3.0 + 0.01 * np.sin(steps)  # |noise| ≤ 0.01, MAD ≈ 0.007: 6 MADs ≈ 0.04
    injected = [80, 150, 222]
    loss[np.array(injected) - 1] += 0.5
    spikes = find_spikes(series(loss), window=50, k=6.0)
    assert [s.step for s in spikes] == injected
    assert all("> median" in s.detail for s in spikes)


def test_no_spike_is_looked_for_before_the_window_is_full():
    assert find_spikes(series([1.0] * 9 + [100.0]), window=10, k=6.0) == []
    assert [s.step for s in find_spikes(series([1.0] * 10 + [100.0]), window=10, k=6.0)] == [11]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_is_a_divergence_not_a_spike(bad):
    loss = [3.0] * 60 + [bad] + [3.0] * 5
    report = analyse(history(loss), LIMITS)
    assert (report.divergence.step, report.divergence.rule) == (61, "non_finite")
    assert report.divergence.detail == f"loss is {bad}"
    assert report.spikes == []


def test_an_infinite_loss_never_enters_or_trips_the_spike_window():
    detector = SpikeDetector(window=3, k=6.0)
    assert [detector.update(x) for x in (1.0, 1.0, 1.0, math.inf, math.nan)] == [None] * 5
    assert list(detector.losses) == [1.0, 1.0, 1.0]


def test_a_spike_on_the_step_whose_gradient_overflows_is_not_reported_the_trainer_never_checks_it():
    loss = [3.0] * 60 + [9.0]
    monitor = DivergenceMonitor(DivergenceConfig())
    verdicts = [monitor.check(step, x, math.inf if step == 61 else 1.0, 1.0) for step, x in enumerate(loss, 1)]
    assert verdicts[-1].events == [(DIVERGENCE, "gradient norm is inf")]
    h = history(loss)
    h.scalars["grad_norm"] = series([1.0] * 60 + [math.inf])
    report = analyse(h, LIMITS)
    assert report.divergence.detail == "gradient norm is inf" and report.spikes == []
    assert [s.step for s in find_spikes(series(loss), 50, 6.0)] == [61]  # the rule alone would flag it


def test_the_trainer_rules_in_order_non_finite_gradient_then_state_norm_then_loss():
    scalars = {"loss": series([3.0, 25.0, 25.0]), "grad_norm": series([1.0, 1.0, math.inf]),
               "h_T_norm": series([1.0, 2e4, 1.0])}
    assert find_divergence(scalars, LIMITS).detail == "‖h_T‖ 2e+04 > max_state_norm 10000"  # listed before max_loss
    scalars["h_T_norm"] = series([1.0, 1.0, 1.0])
    assert find_divergence(scalars, LIMITS).rule == "max_loss"
    scalars["loss"] = series([3.0, 3.0, 3.0])
    assert find_divergence(scalars, LIMITS).detail == "gradient norm is inf"
    assert find_divergence({"loss": series([3.0, 3.0])}, LIMITS) is None  # no gradient or state recorded: loss only


def test_a_stable_run_has_no_divergence_and_no_warning():
    n = 100
    rho = series(0.45 + 0.1 * np.linspace(0, 1, n // 5), start=5, every=5)
    report = analyse(history(3.0 - np.linspace(0, 1, n), 20.0 + np.linspace(0, 30, n), rho=rho), LIMITS)
    assert report.divergence is None and report.warnings == [] and report.spikes == []
    assert set(report.outcomes().values()) == {"quiet"} and set(report.signals) == {"rho", "state_trend", "rho_trend", "loop_level",
                                                                                        "forecast"}


def test_a_warning_without_divergence_is_a_false_alarm_once_the_run_ends_and_lowers_precision():
    n = 50
    alarm = analyse(history([3.0] * n, [10.0] * n, rho=series([0.9] * 20 + [1.05] * 30)), LIMITS)
    hit = analyse(history([3.0] * n, [10.0] * 30 + [1e5] * 20, rho=series([0.9] * 20 + [1.05] * 30)), LIMITS)
    miss = analyse(history([3.0] * n, [10.0] * 30 + [1e5] * 20, rho=series([0.9] * n)), LIMITS)
    running = analyse(history([3.0] * n, [10.0] * n, rho=series([0.9] * 20 + [1.05] * 30)), LIMITS, complete=False)
    assert alarm.warnings[0].outcome == "false_alarm" and alarm.warnings[0].lead_steps is None
    assert running.warnings[0].outcome == "pending" and running.outcomes()["state_trend"] == "pending"
    table = warning_table([alarm, hit, miss, running]).set_index("signal")
    assert table.loc["rho", ["early", "missed", "false_alarm", "pending"]].tolist() == [1, 1, 1, 1]
    assert table.loc["rho", "precision"] == 0.5 and table.loc["rho", "recall"] == 0.5
    assert table.loc["rho", "median_lead_steps"] == 10


def test_a_warning_after_the_divergence_is_late():
    report = analyse(history([3.0] * 40, [10.0] * 10 + [1e5] * 30, rho=series([0.9] * 20 + [1.5] * 20)), LIMITS)
    rho = next(w for w in report.warnings if w.signal == "rho")
    assert (rho.outcome, rho.lead_steps) == ("late", -10)


def test_patience_waits_for_consecutive_probes_and_dates_the_last():
    rho = series([0.9, 1.1, 0.9, 1.1, 1.2, 1.3])  # steps 1..6: 2 and 4 cross, 4-6 stay across
    n = 10
    one = analyse(history([3.0] * n, [10.0] * n, rho=rho), LIMITS, WarningRules(patience=1))
    two = analyse(history([3.0] * n, [10.0] * n, rho=rho), LIMITS, WarningRules(patience=2))
    three = analyse(history([3.0] * n, [10.0] * n, rho=rho), LIMITS, WarningRules(patience=3))
    assert [r.warnings[0].step for r in (one, two, three)] == [2, 5, 6]
    assert "for 2 probes" in two.warnings[0].detail


def test_a_non_finite_spectrum_is_a_warning():
    report = analyse(history([3.0] * 10, [10.0] * 10, rho=series([0.5, math.nan])), LIMITS)
    assert report.warnings[0].step == 2 and report.warnings[0].signal == "rho"


def affine_trace(a: float, b: float, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Increments δ_t and norms of the scalar loop h ← a·h + b from h_0 = 0, t = 1..T."""
    h = [0.0]
    for _ in range(T):
        h.append(a * h[-1] + b)
    h = np.array(h)
    return np.abs(np.diff(h))[None], np.abs(h[1:])[None]


@pytest.mark.parametrize("a", [0.5, 0.9, 1.0, 1.2])
def test_the_loop_rate_of_an_affine_loop_is_its_multiplier(a):
    delta, norm = affine_trace(a, 1.0, 8)
    assert loop_rate(delta, norm, settled=0.0)[0] == pytest.approx(a, rel=1e-12)


def test_a_settled_loop_has_rate_zero_and_an_overflowed_one_infinite_rate():
    delta, norm = affine_trace(0.5, 1.0, 40)  # δ_40 / ‖h_40‖ ≈ 1e-12
    assert loop_rate(delta, norm, settled=1e-3)[0] == 0.0
    assert loop_rate(delta, norm, settled=0.0)[0] == pytest.approx(0.5, rel=1e-6)
    delta, norm = affine_trace(1.2, 1.0, 8)
    delta[0, -1] = norm[0, -1] = math.inf
    assert loop_rate(delta, norm, settled=1e-3)[0] == math.inf


def test_the_state_forecast_of_a_doubling_norm_counts_the_doublings_left():
    steps = np.arange(1, 10)  # 10·2^s < 1e4 up to s = 9
    tau = state_forecast(series(10.0 * 2.0 ** steps), bound=1e4, window=4)
    assert np.isinf(tau.iloc[:3]).all()  # fewer than 4 values yet
    assert np.allclose(tau.iloc[3:], np.log2(1e3) - steps[3:])  # 10·2^s reaches 1e4 at s = log2(1000)
    assert (state_forecast(series([5.0] * 10), 1e4, 4) == np.inf).all()
    assert state_forecast(series([5.0, 2e4, math.nan, math.inf]), 1e4, 2).tolist()[1:] == [0.0, 0.0, 0.0]
    assert state_forecast(series([0.0, 0.0, 0.0]), 1e4, 2).tolist() == [math.inf] * 3  # log 0 = −∞ is not a blow-up


def test_bad_rules_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="patience: must be ≥ 1"):
        WarningRules(patience=0)
    with pytest.raises(ValueError, match="window must be ≥ 0"):
        SpikeDetector(-1, 6.0)
    with pytest.raises(ValueError, match="no 'loss' series"):
        History(scalars={})
    with pytest.raises(ValueError, match="divergence.max_loss"):
        run_divergence_config({"divergence": {"max_state_norm": 1.0}})


# ---- the trainer and the analysis agree -------------------------------------------------------

losses = st.lists(st.floats(0.0, 10.0) | st.sampled_from([math.nan, 50.0]), min_size=1, max_size=120)


@given(losses, st.integers(0, 20), st.floats(0.5, 10.0))
def test_the_trainer_and_the_offline_rule_flag_the_same_spikes(values, window, k):
    monitor = DivergenceMonitor(DivergenceConfig(max_loss=math.inf, spike_window=window, spike_k=k, action="record"))
    online = []
    for step, loss in enumerate(values, start=1):
        verdict = monitor.check(step, loss, 1.0, 1.0)
        if verdict.stop:  # a NaN loss ends training: the offline search stops there too
            break
        online += [(step, detail) for kind, detail in verdict.events if kind == SPIKE]
    loss = series(values)
    stop = find_divergence({"loss": loss}, DivergenceConfig(max_loss=math.inf, max_state_norm=1e4, spike_window=window, spike_k=k))
    if stop:
        loss = loss[loss.index < stop.step]
    assert [(s.step, s.detail) for s in find_spikes(loss, window, k)] == online


step_values = st.tuples(st.floats(0, 30) | st.just(math.nan), st.floats(0, 2) | st.just(math.inf),
                        st.floats(0, 2e4) | st.just(math.nan))


@given(st.lists(step_values, min_size=1, max_size=40))
def test_the_trainer_stops_where_the_offline_rules_find_the_divergence(rows):
    monitor = DivergenceMonitor(DivergenceConfig())  # action "stop", max_loss 20, max_state_norm 1e4
    stopped = None
    for step, (loss, grad, state) in enumerate(rows, start=1):
        verdict = monitor.check(step, loss, grad, state)
        if verdict.stop:
            stopped = (step, verdict.stop)
            break
    scalars = {name: series(column) for name, column in zip(("loss", "grad_norm", "h_T_norm"), zip(*rows))}
    found = find_divergence(scalars, LIMITS)
    assert (found and (found.step, found.detail)) == (stopped and stopped)


# ---- properties of the spike rule ------------------------------------------------------------

@given(st.floats(-1e6, 1e6), st.integers(1, 60), st.integers(1, 200), st.floats(0.1, 100.0))
def test_a_constant_loss_has_no_spikes(value, window, n, k):
    assert find_spikes(series([value] * n), window, k) == []


@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=60), st.floats(0.1, 100.0), st.floats(1e-3, 1e6))
def test_a_spike_beyond_every_mad_multiple_is_always_found(window_values, k, excess):
    """median ≤ max and MAD ≤ max − min, so max + k·(max − min) + excess clears median + k·MAD."""
    top, spread = max(window_values), max(window_values) - min(window_values)
    spike = top + k * spread + excess
    found = find_spikes(series([*window_values, spike]), window=len(window_values), k=k)
    assert [s.step for s in found] == [len(window_values) + 1]


# ---- from the store --------------------------------------------------------------------------

def synthetic_run(lab, run_id="r", steps=40):
    """A run as an older trainer might have recorded it: scalars every step (‖h_T‖ grows ×1.5
    per step from step 15 and crosses 1e4 at step 33), a spectrum and a loop trace every 5
    steps (ρ = 1.2 from step 20), a spike event at step 15, and no divergence event."""
    config = {"divergence": {"max_loss": 20.0, "max_state_norm": 1e4, "action": "record", "spike_window": 10,
                             "spike_k": 6.0}}
    with RunWriter.create(lab, run_id, config, experiment="synthetic") as w:
        for step in range(1, steps + 1):
            w.log(step, {"loss": 5.0 if step == 15 else 3.0, "grad_norm": 0.5,
                         "h_T_norm": 10.0 * 1.5 ** max(0, step - 15), "tokens": step * 100.0, "flops": step * 1e6})
            if step % 5 == 0:
                a = 0.5 if step < 20 else 1.2
                w.log_spectrum(step, [a, 0.1])
                delta, norm = affine_trace(a, 1.0, 6)
                w.log_trace(step, {"delta_norm_mean": delta[0], "state_norm_mean": norm[0]})
            if step == 15:
                w.log_event(step, SPIKE, "recorded by the trainer")
        w.set_status("diverged", 33, "test")
    return open_run(run_id, lab)


def test_a_store_run_reads_into_the_history_the_analysis_expects(tmp_path):
    report = analyse_run(synthetic_run(tmp_path))
    assert report.divergence.step == 33  # 10·1.5^18 > 1e4
    assert [s.step for s in report.spikes] == [15]
    # τ = (log 1e4 − log h_s) / log 1.5 = 17.04 − (s − 15) ≤ 5 from s = 28; the combined warning
    # holds it a second step (29); ρ(Ā) = 1.2 from step 20 fills 11 of the 20 steps 11..30 at 30
    assert {w.signal: w.step for w in report.warnings} == {"rho": 20, "loop_rate": 20, "state_trend": 28,
                                                           "forecast": 29, "loop_level": 30}
    assert report.to_dict()["first_signals"] == ["rho", "loop_rate"]
    assert report.warnings[0].lead_tokens == 1300 and report.warnings[0].lead_flops == 13e6


def test_events_write_adds_warnings_and_the_missing_divergence_and_never_repeats(tmp_path, capsys):
    run = synthetic_run(tmp_path)
    before = run.events()
    assert main(["events", str(run.path), "--write"]) == 0
    out = capsys.readouterr().out
    assert "diverges at step 33" in out and "step 20 by rho, loop_rate; 13 steps" in out
    after = run.events()
    kept = after[after["detail"] == "recorded by the trainer"]
    assert kept[["step", "kind", "time"]].reset_index(drop=True).equals(before[["step", "kind", "time"]])
    added = after[after["detail"] != "recorded by the trainer"]
    assert sorted(zip(added["step"], added["kind"])) == [(20, EARLY_WARNING), (20, EARLY_WARNING),
                                                          (28, EARLY_WARNING), (29, EARLY_WARNING),
                                                          (30, EARLY_WARNING), (33, DIVERGENCE)]
    assert run.results()["events"]["divergence"]["step"] == 33
    assert main(["events", str(run.path), "--write"]) == 0  # a second time adds nothing
    assert len(run.events()) == len(after)


def test_events_over_a_lab_prints_every_run_and_the_precision_table(tmp_path, capsys):
    synthetic_run(tmp_path, "a")
    with RunWriter.create(tmp_path, "b", {"divergence": asdict(LIMITS)}, experiment="synthetic") as w:
        for step in range(1, 21):
            w.log(step, {"loss": 3.0, "h_T_norm": 10.0})
    assert main(["events", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "a  [diverged]" in out and "b  [finished]  no divergence" in out and "precision" in out


def test_events_write_leaves_a_run_in_training_alone_and_skips_an_unreadable_one(tmp_path, capsys):
    synthetic_run(tmp_path, "done")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.db").write_bytes(b"not a database")
    with RunWriter.create(tmp_path, "live", {"divergence": asdict(LIMITS)}, experiment="synthetic") as w:
        w.log(1, {"loss": 3.0})
        w.flush()
        assert main(["events", str(tmp_path), "--write"]) == 0
        assert open_run("live", tmp_path).events().empty
    out = capsys.readouterr().out
    assert "broken: skipped" in out and "not written: a process is training it" in out
    assert "early_warning" in " ".join(open_run("done", tmp_path).events()["kind"])


def test_the_dashboard_marks_every_event_kind_the_analysis_writes():
    sys.path.insert(0, str(REPO / "apps"))
    try:
        from dashkit.names import EVENTS
    finally:
        sys.path.remove(str(REPO / "apps"))
    assert {SPIKE, DIVERGENCE, EARLY_WARNING} <= set(EVENTS)


# ---- a real run ------------------------------------------------------------------------------

def test_a_real_exploding_loop_is_warned_of_no_later_than_it_diverges(tmp_path, corpus_cache, capsys):
    """A free diagonal Ā at LR 0.3 learns ρ(Ā) > 1 within a few steps; probes every step."""
    exp = load_experiment(REPO / "experiments" / "tiny.toml", [
        f"data.cache_dir={corpus_cache}", "model.injection='free-diagonal'", "train.lr=0.3",
        "train.warmup_steps=0", "train.steps=20", "probes.trace_every=1", "probes.spectrum_every=1"])
    assert train(exp, tmp_path, "boom", progress=False) == "diverged"
    run = open_run("boom", tmp_path)
    report = analyse_run(run)
    assert report.divergence.step == run.status()["step"]  # offline = the trainer's verdict
    recorded = run.events()
    assert report.divergence.step in set(recorded.loc[recorded["kind"] == DIVERGENCE, "step"])
    assert report.warnings and report.warnings[0].step <= report.divergence.step
    rho = next(w for w in report.warnings if w.signal == "rho")
    assert rho.outcome == "early" and rho.value >= 1.0
    assert main(["events", "boom", "--lab", str(tmp_path), "--write"]) == 0
    assert EARLY_WARNING in set(run.events()["kind"])


# ---- forecasting (issue 14) -------------------------------------------------------------------

@given(st.floats(0.0, 0.9), st.floats(1e-4, 0.05), st.integers(5, 30))
def test_a_straight_line_towards_the_level_is_forecast_exactly(start, slope, window):
    steps = np.arange(1, 101)
    tau = level_forecast(pd.Series(start + slope * steps, index=steps), 1.0, window)
    crossing = (1.0 - start) / slope
    for s in range(window, 101):
        expected = max(crossing - s, 0.0)
        assert tau[s] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert np.isinf(tau[: window - 1]).all()  # too few measurements: no line yet


def test_a_flat_or_falling_series_is_never_forecast_and_a_non_finite_one_is_there_now():
    steps = np.arange(1, 31)
    assert np.isinf(level_forecast(pd.Series(np.full(30, 0.9), index=steps), 1.0, 5)[5:]).all()
    assert np.isinf(level_forecast(pd.Series(0.9 - 0.01 * steps, index=steps), 1.0, 5)[5:]).all()
    bad = pd.Series(np.r_[np.full(29, 0.5), np.nan], index=steps)
    assert level_forecast(bad, 1.0, 5)[30] == 0.0


def test_a_sparse_series_is_forecast_in_steps():
    rho = series(0.5 + 0.002 * np.arange(0, 100, 10), start=10, every=10)  # every 10 steps, 0.002 per step
    tau = level_forecast(rho, 1.0, 5)
    assert tau[100] == pytest.approx((1.0 - rho[100]) / 0.002)


def late_divergence(n=300, d=200, noise=0.02, seed=0):
    """A radius estimate that climbs from 0.6 through 1 at step d − 40 and a state that then
    grows exponentially to the bound at step d; healthy: the same climb stopping at 0.85."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, n + 1)
    radius = np.minimum(0.6 + 0.4 * steps / (d - 40), 2.0) + noise * rng.standard_normal(n)
    h = 20.0 * np.exp(np.maximum(steps - (d - 40), 0) * math.log(1e4 / 20.0) / 40)
    return steps, radius, h


def test_the_forecast_warns_a_late_divergence_tens_of_steps_ahead():
    steps, radius, h = late_divergence()
    hist = history([3.0] * len(steps), h)
    hist.scalars["jacobian_radius_est"] = pd.Series(radius, index=steps)
    report = analyse(hist, LIMITS, WarningRules())
    assert report.divergence.step == int(steps[h > LIMITS.max_state_norm][0])
    (forecast,) = [w for w in report.warnings if w.signal == "forecast"]
    assert forecast.outcome == "early" and forecast.lead_steps >= 20
    (radius_trend,) = [w for w in report.warnings if w.signal == "radius_trend"]
    assert radius_trend.lead_steps > forecast.lead_steps  # the radius alone warns earlier, and more often


def test_a_radius_that_levels_off_below_one_raises_no_combined_forecast():
    """The radius trend alone fires while the radius still climbs (τ ≤ 50 at 0.84); the
    combined forecast also needs the state heading for the bound, and stays quiet."""
    steps = np.arange(1, 301)
    radius = np.minimum(0.6 + 0.004 * steps, 0.85) + 0.02 * np.random.default_rng(1).standard_normal(300)
    hist = history([3.0] * 300, 20.0 + 0.1 * steps)
    hist.scalars["jacobian_radius_est"] = pd.Series(radius, index=steps)
    report = analyse(hist, LIMITS, WarningRules())
    assert report.outcomes()["forecast"] == "quiet" and report.outcomes()["radius_trend"] == "false_alarm"


def test_warning_scores_count_false_alarms_per_1000_healthy_steps_and_the_lead_percentile():
    steps, radius, h = late_divergence()
    reports = []
    for d in (100, 150, 200, 250):
        s, r, hh = late_divergence(d=d)
        hist = history([3.0] * len(s), hh)
        hist.scalars["jacobian_radius_est"] = pd.Series(r, index=s)
        reports.append(analyse(hist, LIMITS))
    alarm = history([3.0] * 500, [10.0] * 500, rho=series([1.05] * 500))  # ρ(Ā) ≥ 1, never diverges
    reports.append(analyse(alarm, LIMITS))
    table = warning_scores(reports).set_index("signal")
    assert table.loc["rho", "false_alarm"] == 1
    assert table.loc["rho", "false_alarms_per_1000_healthy_steps"] == pytest.approx(2.0)  # 1 in 500 steps
    leads = sorted(w.lead_steps for r in reports[:4] for w in r.warnings if w.signal == "forecast")
    assert table.loc["forecast", "p10_lead_steps"] == pytest.approx(np.percentile(leads, 10))
    assert table.loc["forecast", "recall"] == 1.0
