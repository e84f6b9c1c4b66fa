"""Loop dynamics: what happens inside the loop, iteration by iteration, over training; and
how validation loss falls with test-time depth, with the fitted law L(T) = L∞ + Z·e^(−zT)."""

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import charts, fits, names, session, widgets
from dashkit import lab as labdata


def fit_depth_law(fig, law: str, spec, T: np.ndarray, L: np.ndarray) -> None:
    """Draw the fitted law L(T) on `fig` (extrapolated to 1.5 × the deepest T) and its parameters."""
    if len(T) < len(spec.params) or not np.all(L > 0):
        st.caption(f"{len(T)} depths: too few to fit {spec.formula}")
        return
    result = fits.fit(law, pd.DataFrame({"T": T, "L": L}), bootstrap=0)
    grid = np.linspace(T.min(), 1.5 * T.max(), 200)
    fig.add_scatter(x=grid, y=result.predict(T=grid), mode="lines", name=spec.formula,
                    line={"dash": "dash", "color": "black"})
    shown = {**{k: f"{v:.4g}" for k, v in result.params.items()},
             "in-sample error": f"{100 * result.in_sample_error:.2f}%"}
    for col, (name, value) in zip(st.columns(len(shown)), shown.items()):
        col.metric(name, value)


lab, runs = session.lab(), session.runs()
st.title("Loop dynamics")
run_id = widgets.run_picker(runs, key="loop_run")
token = session.token(runs, run_id)

traces = labdata.traces(lab, run_id, token)
if not traces:
    st.info("This run recorded no loop traces (the trainer records them on probe steps).")
else:
    stats = [n for n in names.TRACES if n in traces] + sorted(set(traces) - set(names.TRACES))
    c = st.columns([2, 1])
    stat = c[0].selectbox("statistic", stats, key="loop_stat")
    log_color = c[1].toggle("log colour scale", value=True, key="loop_log")
    trace = traces[stat]
    iterations = np.arange(1, trace.values.shape[1] + 1)
    widgets.chart(charts.heatmap_figure(stat, trace.steps, trace.values, log_color=log_color),
                  pd.DataFrame({"step": np.repeat(trace.steps, len(iterations)),
                                "iteration": np.tile(iterations, len(trace.steps)), stat: trace.values.ravel()}),
                  f"loop_{run_id}_{stat}")

    steps = trace.steps.tolist()
    step = st.select_slider("training step", steps, value=steps[-1], key="loop_step")
    lines = [(f"step {s}", f"step {s}", iterations, trace.values[steps.index(s)])
             for s in dict.fromkeys([steps[0], step, steps[-1]])]
    widgets.chart(charts.lines_figure(f"{stat} per loop iteration", lines, x_title="loop iteration t",
                                      y_title=stat, log_y=log_color, dash_key=f"step {step}", mode="lines+markers"),
                  pd.DataFrame({"iteration": iterations, **{label: y for _, label, _, y in lines}}),
                  f"loop_{run_id}_{stat}_step")
    at_step = pd.DataFrame({name: traces[name].values[list(traces[name].steps).index(step)]
                            for name in stats if step in traces[name].steps}, index=iterations)
    st.caption(f"every statistic at step {step} (rows: loop iteration t)")
    st.dataframe(at_step.rename_axis("t"))

st.subheader("Test-time depth")
evals = labdata.evals(lab, run_id, token)
val = evals[evals["metric"] == names.VAL_LOSS]
if val.empty:
    st.info(f"This run recorded no `{names.VAL_LOSS}` evaluations at test depths.")
else:
    eval_steps = sorted(val["step"].unique().tolist())
    c = st.columns([2, 1])
    eval_step = c[0].select_slider("evaluation step", eval_steps, value=eval_steps[-1], key="loop_eval_step")
    at = val[val["step"] == eval_step].sort_values("depth")
    T, L = at["depth"].to_numpy(float), at["value"].to_numpy(float)
    mu_rec = names.config_value(labdata.details(lab, run_id, token)["meta"].get("config", {}), "mu_rec")
    fig = charts.lines_figure("validation loss vs test-time depth", [(run_id, f"step {eval_step}", T, L)],
                              x_title="test-time depth T", y_title=names.VAL_LOSS, mode="lines+markers")
    law = c[1].selectbox("law", [k for k, v in fits.LAWS.items() if v.inputs == ("T",)], key="loop_law")
    fit_depth_law(fig, law, fits.LAWS[law], T, L)
    if mu_rec:
        fig.add_vline(x=mu_rec, line_dash="dot", annotation_text="μ_rec (training)")
    widgets.chart(fig, at[["step", "depth", "value"]], f"depth_{run_id}_{eval_step}")
