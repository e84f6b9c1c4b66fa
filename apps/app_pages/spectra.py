"""Spectra: the eigenvalues of Ā against the unit circle, scrubbed over training; how fast
each mode decays per iteration; the Jacobian spectral radius and Lyapunov exponents of the
nonlinear loop where `stabilitylab analyze` recorded them."""

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import charts, names, session, widgets
from dashkit import lab as labdata
from dashkit.series import decay_rates
from stabilitylab import records

ANIMATION_FRAMES = 40

lab, runs = session.lab(), session.runs()
st.title("Spectra")
run_id = widgets.run_picker(runs, key="spectra_run")
token = session.token(runs, run_id)
spectra = labdata.spectra(lab, run_id, token)

if spectra.empty:
    st.info("This run recorded no spectra of Ā (the trainer records them on probe steps).")
else:
    steps = spectra["step"].to_numpy()
    norms = [(key, label, steps, spectra[key].to_numpy()) for key, label in names.SPECTRA.items()
             if key in (records.RHO, records.NORM_A) and spectra[key].notna().any()]
    widgets.chart(charts.lines_figure("ρ(Ā) and ‖Ā‖₂ over training", norms, x_title="training step", hline=1.0),
                  spectra.drop(columns="eigenvalues"), f"spectra_{run_id}_norms")

    c = st.columns([3, 1])
    step = c[0].select_slider("training step", steps.tolist(), value=int(steps[-1]), key="spectra_step")
    animate = c[1].toggle("animate over training", key="spectra_animate",
                          help=f"a play button over {ANIMATION_FRAMES} steps of the run")
    row = spectra[spectra["step"] == step].iloc[0]
    eig = row["eigenvalues"]
    rates = decay_rates(eig)
    m = st.columns(4)
    m[0].metric("ρ(Ā)", f"{row['rho']:.4f}", help="spectral radius: < 1 is stable")
    m[1].metric("‖Ā‖₂", f"{row['norm_a']:.4f}")
    m[2].metric("modes with |λ| ≥ 1", int((np.abs(eig) >= 1).sum()))
    m[3].metric("slowest decay −log|λ|", f"{rates.min():.4f}" if len(rates) else "–")

    frames = None
    if animate:
        pick = np.unique(np.linspace(0, len(spectra) - 1, min(ANIMATION_FRAMES, len(spectra))).astype(int))
        frames = [(int(spectra["step"].iat[i]), spectra["eigenvalues"].iat[i]) for i in pick]
    points = pd.DataFrame({"step": step, "index": np.arange(len(eig)), "real": eig.real, "imag": eig.imag,
                           "abs": np.abs(eig), "decay_rate": rates})
    c = st.columns(2)
    with c[0]:
        widgets.chart(charts.eigen_figure(eig, step, frames), points, f"eigenvalues_{run_id}_{step}")
    with c[1]:
        widgets.chart(charts.histogram_figure("decay rates −log|λ| (< 0: the mode grows)", rates,
                                              x_title="−log|λ| per loop iteration", vline=0.0),
                      points[["step", "index", "decay_rate"]], f"decay_{run_id}_{step}")

st.subheader("The nonlinear loop")
analysis = labdata.analysis(lab, run_id, token)
radius = analysis[analysis["name"] == names.ANALYSIS["jacobian_radius"]]
lyapunov = analysis[analysis["name"] == names.ANALYSIS["lyapunov"]]
if len(radius):
    values = np.array([v[0] for v in radius["values"]])
    widgets.chart(charts.lines_figure("Jacobian spectral radius of the loop map", [
        ("jacobian", "ρ(∂F/∂h)", radius["step"].to_numpy(), values)], x_title="training step", hline=1.0),
        pd.DataFrame({"step": radius["step"], "jacobian_radius": values}), f"jacobian_{run_id}")
if len(lyapunov):
    exponents = np.stack([np.pad(v, (0, max(map(len, lyapunov["values"])) - len(v)), constant_values=np.nan)
                          for v in lyapunov["values"]])
    lines = [(f"λ{i + 1}", f"λ{i + 1}", lyapunov["step"].to_numpy(), exponents[:, i])
             for i in range(exponents.shape[1])]
    widgets.chart(charts.lines_figure("Lyapunov exponents (> 0: nearby states separate)", lines,
                                      x_title="training step", hline=0.0),
                  pd.DataFrame(exponents, columns=[f"lambda_{i + 1}" for i in range(exponents.shape[1])])
                  .assign(step=lyapunov["step"].to_numpy()), f"lyapunov_{run_id}")
if not len(radius) and not len(lyapunov):
    st.info("No Jacobian spectra or Lyapunov exponents recorded for this run.")
