"""Scaling laws: fit a law (test-time, Chinchilla, training, unified) to the final
validation losses of a sweep's runs or to a CSV, with bootstrap intervals and the error on
held-out points."""

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import charts, fits, names, session, widgets
from dashkit import lab as labdata

MAX_CURVES = 8
PAST_TRAINING = "T > μ_rec"  # hold out every point evaluated deeper than its run was trained (the CLI's rule)


lab, runs = session.lab(), session.runs()
st.title("Scaling laws")
laws = fits.LAWS
LINKED = "scaling_linked_experiment"  # an experiment a link asked for
widgets.take_query({"law": "scaling_law", "experiment": LINKED})
st.session_state.setdefault("scaling_law", fits.TEST_TIME)
c = st.columns([1, 2])
source = c[0].radio("data", ["runs of a sweep", "CSV upload"], key="scaling_source")
law = c[1].selectbox("law", list(laws), key="scaling_law",
                     format_func=lambda k: f"{k}: {laws[k].formula}")
spec = laws[law]

if source == "CSV upload":
    upload = st.file_uploader("CSV with one row per point: a loss column and one column per law input",
                              type="csv", key="scaling_csv")
    if upload is None:
        st.info(f"Upload a CSV with the columns {', '.join(spec.inputs)} and L (names can be mapped below).")
        st.stop()
    points = pd.read_csv(upload)
else:
    which = labdata.fittable(lab, session.lab_token(), law)
    best = fits.best_experiment(which)
    experiments = which["experiment"].tolist()
    key = f"scaling_experiment_{law}"  # each law remembers its own experiment
    linked = st.session_state.pop(LINKED, None)
    if linked in experiments:
        st.session_state[key] = linked
    if st.session_state.get(key) not in experiments:
        st.session_state[key] = best or experiments[0]
    experiment = st.selectbox("sweep (experiment)", experiments, key=key,
                              format_func=lambda e: e + ("" if which.set_index("experiment").at[e, "ok"]
                                                         else " (cannot be fitted)"),
                              help="by default the experiment with the most data this law needs")
    bad = which[~which["ok"]]
    if best is None:
        st.warning(f"No experiment of this lab has the data {spec.formula} needs.")
    with st.expander(f"{int(which['ok'].sum())} of {len(which)} experiments can be fitted with this law"
                     + ("" if bad.empty else f"; why not the other {len(bad)}")):
        st.dataframe(which.drop(columns="score"), hide_index=True, key="scaling_fittable")
    members = runs[runs["experiment"] == experiment].rename(columns={names.config_column("mu_rec"): "mu_rec"})
    chosen = st.multiselect("runs", members["run_id"], members.loc[members["status"] == "finished", "run_id"],
                            key=f"scaling_runs_{experiment}", help="only finished runs by default, as "
                            "`stabilitylab fit --lab` fits them")
    picked = members[members["run_id"].isin(chosen)]
    try:
        points = labdata.sweep_points(lab, tuple(zip(picked["run_id"], picked["token"])))
    except ValueError as err:
        st.warning(str(err))
        st.stop()
    if "T" not in spec.inputs:  # one point per run: evaluated at its training depth
        points = points[points["T"] == points["mu_rec"]]
    st.caption("N = N_static + μ_rec · N_core: the unrolled non-embedding parameters (docs/scaling.md), "
               "the N of `stabilitylab fit --lab`; per-run laws use the evaluation at T = μ_rec.")

numeric = [col for col in points.columns if pd.api.types.is_numeric_dtype(points[col])]
mapping = {}
c = st.columns(len(spec.inputs) + 1)
for col, name in zip(c, [*spec.inputs, "L"]):
    if not numeric:
        break
    mapping[name] = col.selectbox(name, numeric, index=numeric.index(name) if name in numeric else 0,
                                  key=f"scaling_col_{name}")
data = pd.DataFrame({name: points[col].to_numpy(float) for name, col in mapping.items()}) if mapping else None
if data is None or data.empty:
    st.info("No points: this sweep has no validation evaluations (or no numeric columns in the CSV).")
    st.stop()
data = data[np.isfinite(data).all(axis=1)].reset_index(drop=True)

c = st.columns([1, 1, 1])
past = {"T", "mu_rec"} <= set(mapping)
choices = ["nothing", *([PAST_TRAINING] if past else []), *spec.inputs]
held_by = c[0].selectbox("hold out points with", choices, key=f"scaling_hold_by_{law}",
                         index=choices.index(PAST_TRAINING if past else "T") if "T" in spec.inputs else 0,
                         help="T > μ_rec: how well the law extrapolates past the depth each run was trained at")
by_value = held_by not in ("nothing", PAST_TRAINING)
default = points["mu_rec"].median() if held_by == "T" and "mu_rec" in points else \
    data[held_by].median() if by_value else 0.0
threshold = c[1].number_input("greater than", value=float(default), key=f"scaling_threshold_{held_by}",
                              disabled=not by_value)
bootstrap = c[2].select_slider("bootstrap resamples", [0, 20, 50, 100], value=50, key="scaling_bootstrap")
holdout = ((data["T"] > data["mu_rec"]).to_numpy() if held_by == PAST_TRAINING
           else (data[held_by] > threshold).to_numpy() if by_value else np.zeros(len(data), bool))

if (~holdout).sum() < len(spec.params):
    st.warning(f"{int((~holdout).sum())} points to fit, but {spec.formula} has {len(spec.params)} parameters.")
    st.stop()
result = fits.fit(law, data, tuple(holdout.tolist()), bootstrap)
data["predicted"] = result.predict(**{n: data[n].to_numpy() for n in spec.inputs})
data["held_out"] = holdout

m = st.columns(3)
m[0].metric("points fitted", result.n_points)
m[1].metric("in-sample error", f"{100 * result.in_sample_error:.2f}%", help="mean |L̂/L − 1| over fitted points")
m[2].metric("held-out error", "–" if result.held_out_error is None else f"{100 * result.held_out_error:.2f}%")
st.dataframe(fits.params_table(result), hide_index=True)

x_name = st.selectbox("x axis", spec.inputs, key="scaling_x")
others = [n for n in spec.inputs if n != x_name]
groups = data.groupby(others) if others else [((), data)]
fig = charts.figure([], {"title": {"text": spec.formula},
                         "xaxis": {"title": {"text": x_name}, **charts.scale(x_name in spec.positive)},
                         "yaxis": {"title": {"text": "L"}}, "legend": {"orientation": "h", "y": -0.25}})
for held, symbol in ((False, "circle"), (True, "circle-open")):
    part = data[data["held_out"] == held]
    fig.add_scatter(x=part[x_name], y=part["L"], mode="markers", name="held out" if held else "fitted",
                    marker={"symbol": symbol, "size": 9, "color": "black"})
if len(groups) <= MAX_CURVES:
    for key, part in groups:
        grid = np.linspace(part[x_name].min(), part[x_name].max() * (1.5 if x_name == "T" else 1), 100)
        inputs = {x_name: grid, **{n: np.full(len(grid), v) for n, v in zip(others, np.atleast_1d(key))}}
        label = ", ".join(f"{n} = {v:.3g}" for n, v in zip(others, np.atleast_1d(key))) or "fit"
        fig.add_scatter(x=grid, y=result.predict(**inputs), mode="lines", name=label,
                        line={"color": charts.color(label)})
widgets.chart(fig, data, f"scaling_{law}")
parity = charts.lines_figure("predicted vs observed", [("parity", "points", data["L"].to_numpy(),
                                                        data["predicted"].to_numpy())],
                             x_title="observed L", y_title="predicted L̂", mode="markers")
lo, hi = float(data[["L", "predicted"]].min().min()), float(data[["L", "predicted"]].max().max())
parity.add_scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="L̂ = L", line={"dash": "dash", "color": "gray"})
widgets.chart(parity, data, f"scaling_{law}_parity")
