"""The combined early warning (issue 14): the loop rule and the nowcast on synthetic
histories with known answers, censoring in the scores, and the tuning script on a tiny
synthetic lab."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stabilitylab.analysis.events import History, WarningRules, analyse, warning_scores
from stabilitylab.analysis.forecast import held, sustained
from stabilitylab.cli import main
from stabilitylab.config import DivergenceConfig
from stabilitylab.store import RunWriter

REPO = Path(__file__).resolve().parents[1]
LIMITS = DivergenceConfig(max_loss=20.0, max_state_norm=1e4, spike_window=50, spike_k=6.0)


def run(radius, h_norm):
    """A history of len(h_norm) steps: flat loss, ‖h_T‖ and the every-step radius estimate."""
    steps = np.arange(1, len(h_norm) + 1)
    scalars = {"loss": pd.Series(3.0, index=steps), "tokens": pd.Series(steps * 256.0, index=steps),
               "h_T_norm": pd.Series(np.asarray(h_norm, float), index=steps)}
    if radius is not None:
        scalars["jacobian_radius_est"] = pd.Series(np.asarray(radius, float), index=steps)
    return History(scalars=scalars)


def forecast(report):
    return next((w for w in report.warnings if w.signal == "forecast"), None)


# ---- the loop rule ---------------------------------------------------------------------------

@given(st.integers(41, 80), st.integers(1, 40), st.integers(1, 10))
def test_a_step_through_the_level_fires_once_more_than_half_the_window_is_above(c, window, patience):
    """0.5 before step c, 1.5 from c (c ≥ window: the window is full by then): the median
    over `window` steps passes 1 when more than half of them are at 1.5 (an even window's
    middle pair averages exactly 1: not above), at c + ⌊window/2⌋, then waits `patience` − 1."""
    steps = np.arange(1, 200)
    m, fires = sustained(pd.Series(np.where(steps < c, 0.5, 1.5), index=steps), 1.0, window, patience)
    assert int(m.index[np.argmax(fires)]) == c + window // 2 + patience - 1


def test_a_sparse_series_holds_its_last_measurement_so_the_window_is_in_steps():
    rho = pd.Series([0.5, 0.5, 0.5, 1.2, 1.2, 1.2, 1.2, 1.2], index=[5, 10, 15, 20, 25, 30, 35, 40])
    m, fires = sustained(rho, 1.0, 20, 1)
    assert list(m.index) == list(range(5, 41))  # every step
    assert int(m.index[np.argmax(fires)]) == 30  # 11 of the 20 steps 11..30 hold 1.2


def test_an_excursion_shorter_than_half_the_window_never_fires():
    radius = np.full(300, 0.8)
    radius[100:109] = 1.3  # 9 steps above: fewer than half of 20
    m, fires = sustained(pd.Series(radius, index=np.arange(1, 301)), 1.0, 20, 1)
    assert not fires.any() and m.max() == pytest.approx(0.8)


def test_an_overflowed_estimate_counts_as_above():
    radius = pd.Series([0.5] * 10 + [math.nan, math.inf, math.nan], index=np.arange(1, 14))
    _, fires = sustained(radius, 1.0, 5, 1)
    assert fires[-1] and not fires[:-1].any()


def test_held_counts_consecutive_entries():
    assert held(np.array([1, 1, 0, 1, 1, 1], bool), 2).tolist() == [False, True, False, False, True, True]


# ---- the combined warning on histories with known answers ------------------------------------

@settings(deadline=None, max_examples=30)
@given(st.integers(60, 150), st.integers(25, 80), st.sampled_from([5, 10, 20]))
def test_a_radius_crossing_one_at_a_known_step_warns_with_a_known_lead(c, gap, window):
    """ρ̂ rises linearly through 1 between steps c and c + 1 (at c + ½); the median of a
    line over `window` steps is its value mid-window, above 1 from step c + ⌊window/2⌋ + 1.
    ‖h_T‖ stays flat until it jumps past the bound at d: the lead is d − that step."""
    d = c + gap
    steps = np.arange(1, d + 11)
    radius = 1.0 + 0.01 * (steps - c - 0.5)
    h = np.where(steps < d, 50.0, 1e5)
    rules = replace(WarningRules(), loop_window=window, loop_patience=1)
    report = analyse(run(radius, h), LIMITS, rules)
    w = forecast(report)
    assert report.divergence.step == d
    assert (w.step, w.lead_steps, w.outcome) == (c + window // 2 + 1, d - c - window // 2 - 1, "early")
    assert w.lead_tokens == w.lead_steps * 256.0


def test_a_noisy_flat_run_raises_no_warning():
    rng = np.random.default_rng(0)
    radius = 0.9 + 0.05 * rng.standard_normal(400)
    h = 50.0 * np.exp(0.2 * rng.standard_normal(400))
    report = analyse(run(radius, h), LIMITS, WarningRules())
    assert report.divergence is None and forecast(report) is None
    assert report.outcomes()["forecast"] == "quiet"


def test_a_radius_hovering_at_one_and_falling_back_raises_no_warning():
    """A healthy free-diagonal-like run: ρ̂ wanders up to ~1 in short bursts."""
    steps = np.arange(1, 401)
    radius = 0.85 + 0.1 * np.sin(steps / 3.0)  # above 1 a third of the time, in bursts of ~3 steps
    report = analyse(run(radius, np.full(400, 100.0)), LIMITS, WarningRules())
    assert forecast(report) is None


def test_a_sudden_blow_up_with_a_contracting_loop_is_caught_by_the_nowcast_a_few_steps_ahead():
    """ρ̂ = 0.1 throughout; ‖h_T‖ doubles every step from step 100 (crosses 1e4 at 107): only
    the nowcast sees it, `nowcast_patience` − 1 steps after the single-step nowcast does."""
    steps = np.arange(1, 121)
    h = 100.0 * 2.0 ** np.maximum(steps - 100, 0)
    rules = WarningRules()
    report = analyse(run(np.full(120, 0.1), h), LIMITS, rules)
    w = forecast(report)
    assert report.divergence.step == 107  # 100 · 2^7 > 1e4
    nowcast = next(x for x in report.warnings if x.signal == "state_trend")
    assert w.step == nowcast.step + rules.nowcast_patience - 1 and w.outcome == "early" and 1 <= w.lead_steps <= 5
    assert not any(x.signal == "loop_level" for x in report.warnings)


def test_one_jump_of_the_state_does_not_fire_the_held_nowcast():
    h = np.full(200, 100.0)
    h[150] = 5e3  # one step 50× up, then back: τ ≤ 5 at that step only
    report = analyse(run(np.full(200, 0.3), h), LIMITS, replace(WarningRules(), nowcast_patience=2))
    assert forecast(report) is None
    assert next(w for w in report.warnings if w.signal == "state_trend").step == 151  # the single-step nowcast does


def test_without_a_radius_estimate_the_loop_rule_reads_rho_of_a():
    steps = np.arange(1, 101)
    h = History(scalars={"loss": pd.Series(3.0, index=steps), "h_T_norm": pd.Series(50.0, index=steps)},
                rho=pd.Series(np.where(np.arange(10, 101, 10) < 50, 0.5, 1.2), index=np.arange(10, 101, 10)))
    report = analyse(h, LIMITS, replace(WarningRules(), loop_window=20))
    w = forecast(report)
    assert w.step == 60 and "ρ(Ā)" in w.detail  # 1.2 held from 50: 11 of the steps 41..60


# ---- scoring, with and without censoring ----------------------------------------------------------

def tiny_set():
    """Two divergences warned 30 and 10 steps ahead, one healthy run warned at step 60 of
    100 and one at step 95 of 100 (within 20 steps of its end), one quiet healthy run."""
    reports = []
    for d, c in ((100, 60), (50, 30)):
        steps = np.arange(1, d + 6)
        radius = np.where(steps < c, 0.5, 1.5)
        reports.append(analyse(run(radius, np.where(steps < d, 50.0, 1e5)), LIMITS, replace(
            WarningRules(), loop_window=20)))
    for c in (50, 85, None):
        radius = np.full(100, 0.5) if c is None else np.where(np.arange(1, 101) < c, 0.5, 1.5)
        reports.append(analyse(run(radius, np.full(100, 50.0)), LIMITS, replace(WarningRules(), loop_window=20)))
    return reports


def test_scores_of_a_tiny_set_strict_and_censoring_aware():
    reports = tiny_set()
    assert [forecast(r).step if forecast(r) else None for r in reports] == [70, 40, 60, 95, None]
    strict = warning_scores(reports).set_index("signal").loc["forecast"]
    assert (strict["early"], strict["false_alarm"], strict["censored"], strict["quiet"]) == (2, 2, 0, 1)
    assert strict["recall"] == 1.0 and strict["precision"] == 0.5
    assert strict["median_lead_steps"] == 20.0 and strict["p10_lead_steps"] == pytest.approx(12.0)
    assert strict["false_alarms_per_1000_healthy_steps"] == pytest.approx(2 / 300 * 1000)
    censored = warning_scores(reports, censor=20).set_index("signal").loc["forecast"]
    assert (censored["false_alarm"], censored["censored"]) == (1, 1)  # 95 > 100 − 20; 60 is not
    assert censored["precision"] == pytest.approx(2 / 3)


def test_events_censor_needs_score(tmp_path, capsys):
    with RunWriter.create(tmp_path, "r", {"divergence": {"max_loss": 20.0, "max_state_norm": 1e4,
                                                         "spike_window": 10, "spike_k": 6.0}},
                          experiment="t") as w:
        for step in range(1, 30):
            w.log(step, {"loss": 3.0, "h_T_norm": 50.0})
        w.set_status("finished", 29, "done")
    assert main(["events", str(tmp_path / "r"), "--censor", "50"]) == 2
    assert main(["events", str(tmp_path / "r"), "--score", "--censor", "nan"]) == 2
    assert main(["events", str(tmp_path / "r"), "--score", "--censor", "50"]) == 0
    assert "censored" in capsys.readouterr().out


# ---- the tuning script --------------------------------------------------------------------------

def test_score_warnings_tunes_on_some_seeds_and_reports_on_the_others(tmp_path):
    """A lab of 4 seeds × (a run whose radius crosses 1 forty steps before it diverges, a
    healthy one): tuned on seeds 0, 1, the held-out seeds 2, 3 are all warned, none falsely."""
    sys.path.insert(0, str(REPO / "experiments"))
    import score_warnings

    config = {"divergence": {"max_loss": 20.0, "max_state_norm": 1e4, "spike_window": 10, "spike_k": 6.0}}
    lab = tmp_path / "toy"
    for seed in range(4):
        for name, diverges in (("bad", True), ("good", False)):
            with RunWriter.create(lab, f"{name}{seed}", config, experiment="toy", seed=seed) as w:
                last = 150 if diverges else 200
                for step in range(1, last + 1):
                    radius = (0.5 if step < 100 else 1.5) if diverges else 0.6
                    h = 1e5 if diverges and step == last else 50.0
                    w.log(step, {"loss": 3.0, "h_T_norm": h, "jacobian_radius_est": radius, "tokens": 256.0 * step})
                w.set_status("diverged" if diverges else "finished", last, "test")
    report = score_warnings.evaluate([str(lab)], None, [0, 1])
    assert report["tuned_on"]["runs"] == 4 and report["held_out_runs"] == 4
    row = next(r for r in report["strict"]["pooled"] if r["signal"] == "forecast")
    assert (row["early"], row["false_alarm"], row["recall"], row["precision"]) == (2, 0, 1.0, 1.0)
    w = report["settings"]["loop_window"]
    assert row["median_lead_steps"] == 50 - w // 2  # radius 1.5 from step 100, divergence at 150
    assert {r["run"] for r in report["runs"]["held_out"]} == {"bad2", "good2", "bad3", "good3"}


# ---- experiments/report.py: §C2's generated block -----------------------------------------------

def test_report_rewrites_only_the_marked_block(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    import report

    doc = tmp_path / "REPORT.md"
    doc.write_text("# C1\nkept\n<!-- c2:begin -->\nold\n<!-- c2:end -->\n# C3\nkept too\n")
    assert report.write_block(doc, "c2", "new\ntable")
    assert doc.read_text() == "# C1\nkept\n<!-- c2:begin -->\nnew\ntable\n<!-- c2:end -->\n# C3\nkept too\n"
    assert not report.write_block(doc, "c9", "x") and not report.write_block(tmp_path / "none.md", "c2", "x")
    rows = [{"signal": "forecast", "early": 2, "late": 0, "missed": 0, "false_alarm": 1, "censored": 0,
             "recall": 1.0, "precision": 2 / 3, "median_lead_steps": 20.0, "p10_lead_steps": 12.0,
             "median_lead_tokens": 5120.0, "false_alarms_per_1000_healthy_steps": math.nan}]
    assert report.score_rows(rows) == ["| **combined warning** | 2 | 0 | 0 | 1 | 0 | 1.00 | 0.67 | 20 | 12 | 5,120 | — |"]
