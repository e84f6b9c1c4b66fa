"""Loop dynamics: what happens inside the loop, iteration by iteration, over training, for
two runs side by side (by default the lab's headline pair: unconstrained left, constrained
right) on one colour scale; and how validation loss falls with test-time depth, with the
fitted law L(T) = L∞ + Z·e^(−zT)."""

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import charts, names, session, widgets
from dashkit import lab as labdata

SIDES = ("left", "right")


def nearest(steps: np.ndarray, step: int) -> int:
    """The recorded step closest to `step` (the two runs need not probe at the same steps)."""
    return int(steps[np.abs(np.asarray(steps) - step).argmin()])


def fit_depth_law(column, fig, law: str, spec, T: np.ndarray, L: np.ndarray, key: str, side: str) -> None:
    """(Uses `fits`, imported below once the heatmaps are drawn.) Draw the fitted law L(T) on `fig` (extrapolated to 1.5 × the deepest T) and its parameters."""
    if len(T) < len(spec.params) or not np.all(L > 0):
        column.caption(f"{side}: {len(T)} depths, too few to fit {spec.formula}")
        return
    result = fits.fit(law, pd.DataFrame({"T": T, "L": L}), bootstrap=0)
    grid = np.linspace(T.min(), 1.5 * T.max(), 200)
    fig.add_scatter(x=grid, y=result.predict(T=grid), mode="lines", name=f"{side}: {spec.formula}",
                    line={"dash": "dash", "color": charts.color(key)})
    shown = {**{k: f"{v:.4g}" for k, v in result.params.items()},
             "in-sample error": f"{100 * result.in_sample_error:.2f}%"}
    for col, (name, value) in zip(column.columns(len(shown)), shown.items()):
        col.metric(f"{name} ({side})", value)


lab, runs = session.lab(), session.runs()
st.title("Loop dynamics")
pair = widgets.pair_picker(runs, "loop", session.first_pair())
tokens = [session.token(runs, r) for r in pair]
traces = [labdata.traces(lab, r, t) for r, t in zip(pair, tokens)]

if not any(traces):
    st.info("Neither run recorded loop traces (the trainer records them on probe steps).")
else:
    present = [n for n in [*names.TRACES, *sorted(set().union(*traces) - set(names.TRACES))]
               if any(n in t for t in traces)]
    c = st.columns([2, 1])
    stat = c[0].selectbox("statistic", present, key="loop_stat")
    log_color = c[1].toggle("log colour scale", value=True, key="loop_log")
    shown = [(side, run_id, t[stat]) for side, run_id, t in zip(SIDES, pair, traces) if stat in t]
    zrange = charts.color_range([tr.values for _, _, tr in shown], log_color)
    all_steps = np.unique(np.concatenate([tr.steps for _, _, tr in shown]))
    step = st.select_slider("training step", all_steps.tolist(), value=int(all_steps[-1]), key="loop_step",
                            help="each run shows its probe nearest to this step")
    y_range = charts.shared_range([tr.values for _, _, tr in shown], log_color)
    cols = st.columns(2)
    for col, side, run_id, t in zip(cols, SIDES, pair, traces):
        with col:
            if stat not in t:
                st.info(f"`{run_id}` recorded no `{stat}` trace.")
                continue
            trace = t[stat]
            iterations = np.arange(1, trace.values.shape[1] + 1)
            widgets.chart(charts.heatmap_figure(stat, trace.steps, trace.values, log_color=log_color, zrange=zrange,
                                                subtitle=f"{side}: {run_id}"),
                          pd.DataFrame({"step": np.repeat(trace.steps, len(iterations)),
                                        "iteration": np.tile(iterations, len(trace.steps)),
                                        stat: trace.values.ravel()}), f"loop_{side}_{stat}")
            steps = trace.steps.tolist()
            at = nearest(trace.steps, step)
            lines = [(f"step {s}", f"step {s}", iterations, trace.values[steps.index(s)])
                     for s in dict.fromkeys([steps[0], at, steps[-1]])]
            widgets.chart(charts.lines_figure(f"{stat} per loop iteration ({side})", lines,
                                              x_title="loop iteration t", y_title=stat, log_y=log_color,
                                              dash_key=f"step {at}", mode="lines+markers", y_range=y_range),
                          pd.DataFrame({"iteration": iterations, **{label: y for _, label, _, y in lines}}),
                          f"loop_{side}_{stat}_step")
            at_step = pd.DataFrame({name: t[name].values[list(t[name].steps).index(at)]
                                    for name in present if name in t and at in t[name].steps}, index=iterations)
            st.caption(f"every statistic at step {at} (rows: loop iteration t)")
            st.dataframe(at_step.rename_axis("t"), key=f"loop_table_{side}")

st.subheader("Test-time depth")
evals = [labdata.evals(lab, r, t) for r, t in zip(pair, tokens)]
vals = [e[e["metric"] == names.VAL_LOSS] for e in evals]
if all(v.empty for v in vals):
    st.info(f"Neither run recorded `{names.VAL_LOSS}` evaluations at test depths.")
else:
    from dashkit import fits  # scipy (~1.5 s to import) only once the heatmaps are on screen

    law = st.selectbox("law", [k for k, v in fits.LAWS.items() if v.inputs == ("T",)], key="loop_law")
    fig = charts.lines_figure("validation loss vs test-time depth (last evaluation)", [],
                              x_title="test-time depth T", y_title=names.VAL_LOSS)
    parts, cols = [], st.columns(2)
    for col, side, run_id, token, val in zip(cols, SIDES, pair, tokens, vals):
        if val.empty:
            col.caption(f"{side}: no `{names.VAL_LOSS}` evaluations")
            continue
        at = val[val["step"] == val["step"].max()].sort_values("depth")
        T, L = at["depth"].to_numpy(float), at["value"].to_numpy(float)
        fig.add_scatter(x=T, y=L, mode="lines+markers", name=f"{side}: step {int(at['step'].iat[0])}",
                        line={"color": charts.color(side)})
        fit_depth_law(col, fig, law, fits.LAWS[law], T, L, side, side)
        mu_rec = names.config_value(labdata.details(lab, run_id, token)["meta"].get("config", {}), "mu_rec")
        if mu_rec:
            fig.add_vline(x=mu_rec, line_dash="dot", line_color=charts.color(side),
                          annotation_text=f"μ_rec ({side})")
        parts.append(at.assign(run=run_id)[["run", "step", "depth", "value"]])
    widgets.chart(fig, pd.concat(parts), "depth_pair")
