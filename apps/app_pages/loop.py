"""Loop dynamics: what happens inside the loop, iteration by iteration, over training, for
two runs side by side (by default the lab's headline pair: unconstrained left, constrained
right) on one colour scale; and how validation loss falls with test-time depth, with the
fitted law L(T) = L∞ + Z·e^(−zT); and, where `stabilitylab exit` recorded one, each run's
adaptive-exit analysis."""

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


def exit_section(side: str, run_id: str, token: tuple) -> None:
    """`stabilitylab exit`'s report of one run (ExitReport.to_dict, read as plain JSON: the
    dashboard does not import analysis.exits, which needs torch): loss vs mean exit depth per
    rule, predicted vs measured exit depth per ε, and the prediction error over checkpoints."""
    doc = labdata.details(lab, run_id, token)["results"].get(names.EXIT_RESULT)
    if not doc:
        st.info(f"`{run_id}` has no exit analysis: run `stabilitylab exit {run_id}` to record one.")
        return
    at = "" if doc.get("step") is None else f" at step {doc['step']}"
    st.caption(f"{doc['target']}{at}: batch {'×'.join(map(str, doc['batch']))}, max depth {doc['max_depth']}, "
               f"μ_rec {doc['mu_rec']}, L(μ_rec) = {doc['reference_loss']:.4f}")
    curves = [(c["criterion"], [p["mean_depth"] for p in c["points"]], [p["loss"] for p in c["points"]],
               [p["eps"] for p in c["points"]]) for c in doc["curves"]]
    widgets.chart(charts.exit_loss_figure(f"loss vs mean exit depth ({side})", curves, doc["loss_by_depth"],
                                          doc["reference_loss"], doc["mu_rec"]),
                  pd.DataFrame([{"criterion": c["criterion"], **p} for c in doc["curves"] for p in c["points"]]),
                  f"exit_{side}_loss")
    saved = pd.DataFrame({c["criterion"]: {f"δ = {float(d):g}": s for d, s in c["saved"].items()}
                          for c in doc["curves"]})
    if not saved.empty:
        st.caption("compute saved vs μ_rec at loss increase ≤ δ (— : no threshold within δ)")
        st.dataframe(saved.T.map(lambda s: "—" if pd.isna(s) else f"{100 * s:.0f}%"), key=f"exit_saved_{side}")
    for name, why in doc.get("skipped", {}).items():
        st.caption(f"{name}: not measured ({why})")
    preds = doc.get("predictions", [])
    if preds:
        widgets.chart(charts.exit_prediction_figure(f"predicted vs measured exit depth ({side})",
                                                    [(p["eps"], p["predicted"], p["measured"]) for p in preds],
                                                    doc["max_depth"]),
                      pd.DataFrame([{"eps": p["eps"], "predicted": a, "measured": b, "rate": q}
                                    for p in preds for a, b, q in zip(p["predicted"], p["measured"], p["rate"])]),
                      f"exit_{side}_pred")
        st.caption("; ".join(f"ε = {p['eps']:g}: r = {p['corr']:.2f}, median |err| = {p['median_abs_error']:.1f}, "
                             f"exact {100 * p['exact']:.0f}%" for p in preds))
    errors = labdata.analysis(lab, run_id, token)
    errors = errors[(errors["name"] == names.EXIT_PRED_ERROR) & (errors["values"].map(len) == len(preds))]
    if len(errors) > 1 and preds:  # several checkpoints, each with this report's thresholds
        steps = errors["step"].to_numpy()
        table = np.stack(errors["values"].to_numpy())
        lines = [(f"eps:{p['eps']:g}", f"ε = {p['eps']:g}", steps, table[:, i]) for i, p in enumerate(preds)]
        widgets.chart(charts.lines_figure(f"exit prediction error over training ({side})", lines,
                                          x_title="training step", y_title="median |predicted − measured|",
                                          mode="lines+markers"),
                      pd.DataFrame({"step": steps, **{label: y for _, label, _, y in lines}}), f"exit_{side}_steps")


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

st.subheader("Adaptive exit")
with st.expander("Adaptive exit analysis (`stabilitylab exit`)", expanded=True):
    for col, side, run_id, token in zip(st.columns(2), SIDES, pair, tokens):
        with col:
            exit_section(side, run_id, token)
