"""The dashboard's pure pieces: smoothing, display downsampling, seed bands, colours, and
figures that plotly accepts with full validation."""

import base64

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from dashboard_lab import config

from dashkit import charts, graph
from dashkit.series import decay_rates, ema, minmax_indices, seed_band, value_at


def naive_ema(steps, values, halflife):
    out = []
    for i in range(len(values)):
        w = 0.5 ** ((steps[i] - steps[:i + 1]) / halflife)
        ok = np.isfinite(values[:i + 1])
        out.append((w[ok] * values[:i + 1][ok]).sum() / w[ok].sum() if ok.any() else np.nan)
    return np.array(out)


@pytest.mark.parametrize("halflife", [0.5, 3.0, 40.0, 5000.0])
def test_ema_is_the_time_weighted_debiased_average(halflife):
    rng = np.random.default_rng(0)
    steps = np.sort(rng.choice(20000, 400, replace=False))  # uneven gaps, some far beyond the EMA's span
    values = rng.standard_normal(400)
    np.testing.assert_allclose(ema(steps, values, halflife), naive_ema(steps, values, halflife), rtol=1e-9, atol=1e-12)


def test_ema_forgets_by_step_gap_not_by_sample_count():
    # after a gap of 10 half-lives the old level is nearly forgotten; after one sample of gap 1 it is not
    steps = np.array([0, 1, 2, 3, 43])
    values = np.array([0.0, 0.0, 0.0, 0.0, 1.0])
    assert ema(steps, values, halflife=4.0)[-1] > 0.99
    assert ema(np.arange(5), values, halflife=4.0)[-1] < 0.3


def test_ema_skips_nan_and_inf_and_starts_unbiased():
    values = np.array([2.0, np.nan, np.inf, 2.0])
    out = ema(np.arange(4), values, halflife=10.0)
    np.testing.assert_allclose(out, 2.0)  # debiased: no pull toward zero at the start
    np.testing.assert_array_equal(ema(np.arange(4), values, 0), values)


def test_ema_of_a_huge_smooth_state_norm_stays_finite():
    steps = np.arange(100000)
    values = np.exp(steps / 4000.0)  # up to e^25, like an exploding ‖h_T‖
    out = ema(steps, values, halflife=1.0)
    assert np.isfinite(out).all() and np.all(np.abs(out / values - 1) < 1e-3)


def test_minmax_keeps_spikes_ends_and_size():
    y = np.sin(np.linspace(0, 20, 100000))
    y[31337], y[77777] = 50.0, -50.0
    keep = minmax_indices(y, 600)
    assert len(keep) <= 602 and keep[0] == 0 and keep[-1] == len(y) - 1
    assert {31337, 77777} <= set(keep.tolist())
    assert np.all(np.diff(keep) > 0)
    assert y[keep].max() == y.max() and y[keep].min() == y.min()


def test_minmax_short_series_unchanged_and_nan_buckets_kept_as_gaps():
    np.testing.assert_array_equal(minmax_indices(np.arange(10.0), 600), np.arange(10))
    y = np.ones(10000)
    y[5000:6000] = np.nan
    keep = minmax_indices(y, 100)
    assert np.isnan(y[keep]).any()  # the gap still shows
    assert np.isfinite(y[keep]).sum() >= 45  # one point per finite bucket of a flat line


def test_seed_band_is_mean_plus_minus_std_on_the_union_of_steps():
    steps, mean, lower, upper = seed_band([(np.array([0, 2, 4]), np.array([1.0, 1.0, 1.0])),
                                           (np.array([0, 1, 2]), np.array([3.0, 3.0, np.nan]))])
    np.testing.assert_array_equal(steps, [0, 1, 2, 4])
    np.testing.assert_allclose(mean, [2, 2, 1, 1])  # seed 2 has no finite value past step 1
    np.testing.assert_allclose(upper - mean, [1, 1, 0, 0])
    np.testing.assert_allclose(mean - lower, upper - mean)


def test_value_at_interpolates_over_finite_points():
    np.testing.assert_allclose(value_at([0, 10, 20], [0.0, np.nan, 20.0], [5, 20]), [5.0, 20.0])
    assert np.isnan(value_at([0, 1], [np.nan, np.nan], [0])).all()


def test_decay_rates_are_negative_exactly_for_growing_modes():
    rates = decay_rates(np.array([0.5, -1.2, 1j, 0.9 * np.exp(1j)]))
    np.testing.assert_allclose(rates, [np.log(2), -np.log(1.2), 0.0, -np.log(0.9)], atol=1e-15)


def test_run_colour_is_stable_and_from_the_palette():
    assert charts.color("lr-sweep/parcae-s0") == charts.color("lr-sweep/parcae-s0")
    assert charts.color("lr-sweep/parcae-s0") in charts.PALETTE
    assert len({charts.color(f"run{i}") for i in range(200)}) > len(charts.PALETTE) // 2


def validated(fig: go.Figure | dict) -> go.Figure:
    """Rebuild with plotly's full validation (the dashboard skips it for speed)."""
    return go.Figure(fig if isinstance(fig, dict) else fig.to_dict())


def length(values) -> int:
    """Points in a trace's array, packed (plotly.js typed-array spec) or not."""
    if isinstance(values, dict):
        return len(base64.b64decode(values["bdata"])) // 8
    return len(values)


def test_every_figure_builder_passes_plotly_validation():
    steps = np.arange(1, 3001)
    loss = 3 - np.log(steps) / 5
    curves = [charts.Curve("a", "a", 0, steps.astype(float), loss, loss + 0.01),
              charts.Curve("b", "b (N=2)", 1, steps.astype(float), loss, loss, loss - 0.1, loss + 0.1,
                           members=[(steps.astype(float), loss - 0.1), (steps.astype(float), loss + 0.1)])]
    panel = charts.Panel("loss", ["parcae", "concat"], "step", log_y=True, hline=1.0, smoothed=True, curves=curves,
                         vlines=[("b", 1, 2500.0)])
    panel.markers = charts.event_markers("b", 1, [(2500, "divergence", "NaN"), (10, "resume", "")], [2500, 10],
                                         [1.0, 2.0])
    fig = validated(charts.panel_figure(panel))
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    lines = [t for t in fig.data if t.fill != "toself" and t.line.width != 1]
    assert max(length(t.x) for t in lines) <= charts.DISPLAY_POINTS + 2  # downsampled for display
    assert [t.name for t in fig.data if t.showlegend is not False and t.mode == "lines"] == ["a", "b (N=2)"]
    assert {t.name for t in fig.data if t.mode == "markers"} == {"divergence", "event"}
    eig = 0.9 * np.exp(1j * np.linspace(0, 3, 16))
    validated(charts.eigen_figure(eig, 10, frames=[(10, eig), (20, 1.1 * eig)]))
    validated(charts.histogram_figure("h", decay_rates(eig), x_title="x", vline=0.0))
    validated(charts.heatmap_figure("s", steps[:50], np.random.rand(50, 8), log_color=True))
    validated(charts.lines_figure("l", [("k", "k", steps, loss)], x_title="step", log_y=True, hline=1.0))
    validated(graph.figure_of(graph.build(config("concat", 1e-3, 10), None), "arch"))
    validated(charts.side_by_side_figure([("ρ", False, 1.0), ("h", True, None)],
                                         [("left", "l", 0, steps, loss), ("right", "r", 1, steps, loss)], x_title="step"))
    cells = pd.DataFrame({"row": ["a", "b"], "col": ["1", "1"], "finished": [2, 0], "spiked": [0, 1],
                          "diverged": [0, 1], "n": [2, 2], "worst": [0, 2]})
    validated(charts.outcome_figure("o", cells, ["a", "b"], ["1"], "injection", "lr"))
    validated(charts.parallel_figure("p", [{"label": "lr", "values": [1.0, 2.0]}], np.array([1.0, np.nan]), "loss"))
    validated(charts.exit_loss_figure("e", [("latent", [2.5, 4.0], [2.3, 2.2], [0.1, 0.01])], [2.4, 2.2, 2.2], 2.2, 2))
    validated(charts.exit_prediction_figure("p", [(0.1, [1, 2, 3], [1, 3, 3])], 6))


def test_architecture_graph_unrolls_the_loop_and_annotates_the_injection():
    cfg = config("concat", 1e-3, 10, mu_rec=8)
    g = graph.build(cfg, {"rho": 1.05, "norm_a": 1.2, "norm_b": 0.8})
    injections = [n for n in g if g.nodes[n]["kind"] == "inject"]
    assert injections == ["inject1", "inject2", "inject3", "inject8"]  # 8 iterations, the middle elided
    assert all(g.has_edge("e", n) for n in injections) and g.has_edge("h0", "inject1")
    assert "ρ(Ā) = 1.05" in g.nodes["inject1"]["hover"] and "‖B̄‖₂ = 0.8" in g.nodes["inject1"]["hover"]
    grads = {n: g.nodes[n]["kind"] for n in g if g.nodes[n]["kind"].startswith("core")}
    assert grads == {"core1": "core-no-grad", "core2": "core-no-grad", "core3": "core-no-grad", "core8": "core"}
    fig = graph.figure_of(g, "t")
    assert "crimson" in fig.data[0].marker.color  # ρ ≥ 1: the injection is drawn red
