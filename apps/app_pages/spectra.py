"""Spectra, two runs side by side (by default the lab's headline pair: unconstrained left,
constrained right): ρ(Ā) and ‖Ā‖₂ over training on one chart; the eigenvalues of Ā against
the unit circle at a chosen step, on shared axes; how fast each mode decays per
iteration; the Jacobian spectral radius and Lyapunov exponents of the nonlinear loop where
they were recorded."""

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import charts, names, session, widgets
from dashkit import lab as labdata
from dashkit.series import decay_rates
from stabilitylab import records

ANIMATION_FRAMES = 40
SIDES = ("left", "right")


def nearest(steps: np.ndarray, step: int) -> int:
    return int(np.abs(np.asarray(steps) - step).argmin())


lab, runs = session.lab(), session.runs()
st.title("Spectra")
pair = widgets.pair_picker(runs, "spectra", session.first_pair())
tokens = [session.token(runs, r) for r in pair]
spectra = [labdata.spectra(lab, r, t) for r, t in zip(pair, tokens)]

if all(s.empty for s in spectra):
    st.info("Neither run recorded spectra of Ā (the trainer records them on probe steps).")
else:
    lines, exports = [], []
    for side, run_id, s in zip(SIDES, pair, spectra):
        for key, dash in ((records.RHO, "solid"), (records.NORM_A, "dot")):
            if len(s) and s[key].notna().any():
                lines.append((side, f"{names.SPECTRA[key]} ({side})", s["step"].to_numpy(), s[key].to_numpy(), dash))
        exports.append(s.drop(columns="eigenvalues").assign(run=run_id))
    widgets.chart(charts.lines_figure("ρ(Ā) (solid) and ‖Ā‖₂ (dotted) over training", lines,
                                      x_title="training step", hline=1.0),
                  pd.concat(exports), "spectra_norms")

    all_steps = np.unique(np.concatenate([s["step"].to_numpy() for s in spectra if len(s)]))
    c = st.columns([3, 1])
    step = c[0].select_slider("training step", all_steps.tolist(), value=int(all_steps[-1]), key="spectra_step",
                              help="each run shows its spectrum nearest to this step")
    animate = c[1].toggle("animate over training", key="spectra_animate",
                          help=f"a play button over {ANIMATION_FRAMES} steps of each run")
    rows = [s.iloc[nearest(s["step"], step)] if len(s) else None for s in spectra]
    eig = [r["eigenvalues"] if r is not None else np.empty(0, complex) for r in rows]
    rates = [decay_rates(e) for e in eig]
    frames = [None, None]
    if animate:
        frames = [[(int(s["step"].iat[i]), s["eigenvalues"].iat[i])
                   for i in np.unique(np.linspace(0, len(s) - 1, min(ANIMATION_FRAMES, len(s))).astype(int))]
                  if len(s) else None for s in spectra]
    reach = max(1.1, *(float(np.abs(e).max(initial=0)) * 1.1 for e in eig),
                *(float(np.abs(e).max(initial=0)) * 1.1 for f in frames if f for _, e in f))
    finite = np.concatenate([r[np.isfinite(r)] for r in rates]) if any(len(r) for r in rates) else np.zeros(1)
    span = (min(float(finite.min()), 0.0) - 0.05, float(finite.max()) + 0.05) if finite.size else None
    cols = st.columns(2)
    for col, side, run_id, row, e, r, f in zip(cols, SIDES, pair, rows, eig, rates, frames):
        with col:
            if row is None:
                st.info(f"`{run_id}` recorded no spectra.")
                continue
            at = int(row["step"])
            st.caption(f"**{side}** · `{run_id}` · step {at}")  # the side once, so the labels fit their columns
            m = st.columns(4)
            m[0].metric("ρ(Ā)", f"{row['rho']:.4f}", help=f"{side}: spectral radius, < 1 is stable")
            m[1].metric("‖Ā‖₂", f"{row['norm_a']:.4f}", help=f"{side}: the largest singular value of Ā")
            m[2].metric("|λ| ≥ 1", int((np.abs(e) >= 1).sum()), help=f"{side}: modes that do not decay")
            m[3].metric("min decay", f"{r.min():.3g}" if len(r) else "–",
                        help=f"{side}: the slowest decay rate, min −log|λ| per loop iteration (< 0: a mode grows)")
            points = pd.DataFrame({"step": at, "index": np.arange(len(e)), "real": e.real, "imag": e.imag,
                                   "abs": np.abs(e), "decay_rate": r})
            widgets.chart(charts.eigen_figure(e, at, f, reach=reach, title=f"{side}: eigenvalues of Ā at step {at}"),
                          points, f"eigenvalues_{side}_{at}")
            widgets.chart(charts.histogram_figure(f"{side}: decay rates −log|λ| (< 0: the mode grows)", r,
                                                  x_title="−log|λ| per loop iteration", vline=0.0, x_range=span,
                                                  key=side),
                          points[["step", "index", "decay_rate"]], f"decay_{side}_{at}")
            st.caption(f"`{run_id}`")

st.subheader("The nonlinear loop")
analysis = [labdata.analysis(lab, r, t) for r, t in zip(pair, tokens)]
radius = [a[a["name"] == names.ANALYSIS["jacobian_radius"]] for a in analysis]
lyapunov = [a[a["name"] == names.ANALYSIS["lyapunov"]] for a in analysis]
if any(len(r) for r in radius):
    lines = [(side, f"ρ(∂F/∂h) ({side})", r["step"].to_numpy(), np.array([v[0] for v in r["values"]]))
             for side, r in zip(SIDES, radius) if len(r)]
    widgets.chart(charts.lines_figure("Jacobian spectral radius of the loop map", lines, x_title="training step",
                                      hline=1.0, mode="lines+markers"),
                  pd.concat([pd.DataFrame({"run": run_id, "step": r["step"], "jacobian_radius": [v[0] for v in r["values"]]})
                             for run_id, r in zip(pair, radius)]), "jacobian_pair")
if any(len(ly) for ly in lyapunov):
    stacks = [np.stack([np.pad(v, (0, max(map(len, ly["values"])) - len(v)), constant_values=np.nan)
                        for v in ly["values"]]) if len(ly) else None for ly in lyapunov]
    y_range = charts.shared_range([s for s in stacks if s is not None], log=False)
    cols = st.columns(2)
    for col, side, run_id, ly, ex in zip(cols, SIDES, pair, lyapunov, stacks):
        if ex is None:
            col.info(f"`{run_id}` recorded no Lyapunov exponents.")
            continue
        lines = [(side if i == 0 else f"{side}:{i}", f"λ{i + 1}", ly["step"].to_numpy(), ex[:, i],
                  "solid" if i == 0 else "dot") for i in range(ex.shape[1])]
        with col:
            widgets.chart(charts.lines_figure(f"{side}: Lyapunov exponents (> 0: nearby states separate)", lines,
                                              x_title="training step", hline=0.0, y_range=y_range),
                          pd.DataFrame(ex, columns=[f"lambda_{i + 1}" for i in range(ex.shape[1])])
                          .assign(step=ly["step"].to_numpy()), f"lyapunov_{side}")
if not any(len(r) for r in radius) and not any(len(ly) for ly in lyapunov):
    st.info("No Jacobian spectra or Lyapunov exponents recorded for these runs.")
