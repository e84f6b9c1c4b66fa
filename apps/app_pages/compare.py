"""Compare: constrained vs unconstrained side by side. Loss, gradient norm, ρ(Ā) against
the ρ = 1 line, ‖h_T‖ and ‖e‖ over training, with spikes and divergences marked."""

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import charts, names, session, widgets
from dashkit import lab as labdata
from dashkit.series import ema, seed_band, value_at
from stabilitylab import records

PANELS = [  # title, source ("scalar" or "spectra"), name, log y by default, reference line
    ("loss", "scalar", names.SCALARS["loss"], False, None),
    ("grad norm", "scalar", names.SCALARS["grad_norm"], True, None),
    ("ρ(Ā)", "spectra", records.RHO, False, 1.0),
    ("max ‖h_T‖", "scalar", names.SCALARS["state_norm"], True, None),
    ("‖e‖", "spectra", records.NORM_E, False, None),
]
X_AXES = {"step": None, "tokens": names.SCALARS["tokens"], "FLOPs": names.SCALARS["flops"]}
HALF_LIVES = [0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


def groups_of(runs: pd.DataFrame, mode: str) -> tuple[list[str], dict[str, int]]:
    """Facet titles, and each shown run's facet."""
    if mode == "selected runs":
        return ["selected runs"], {r: 0 for r in session.selected()}
    injection = runs[names.config_column("injection")].fillna("?").astype(str)
    facets = sorted(injection.unique())
    return facets, {r: facets.index(i) for r, i in zip(runs["run_id"], injection)}


lab, runs = session.lab(), session.runs()
st.title("Compare")
mode = st.radio("Runs", ["by injection", "selected runs"], horizontal=True, key="compare_mode",
                help="by injection: every run of the lab, one column per injection; or the runs selected")
facets, facet_of = groups_of(runs, mode)
if not facet_of:
    st.info("No runs selected: pick some on the Runs page or in the sidebar, or compare by injection.")
    st.stop()
rows = runs.set_index("run_id").loc[list(facet_of)]

c = st.columns([1.2, 2, 1, 1])
axis = c[0].radio("x axis", list(X_AXES), horizontal=True, key="compare_x")
longest = float(rows["last_step"].max())
auto = min(HALF_LIVES[1:], key=lambda h: abs(h - 0.01 * longest))  # about 1% of the longest run
halflife = c[1].select_slider("smoothing half-life (steps)", HALF_LIVES, value=auto, key="compare_smooth",
                              help="time-weighted EMA: uneven step gaps decay by their length")
seeds = c[2].toggle("seeds: mean ± std", key="compare_seeds", help="runs of one sweep cell as one band")
log_x = c[3].toggle("log x", key="compare_logx")
log_y = st.multiselect("log y", [p[0] for p in PANELS], [p[0] for p in PANELS if p[3]], key="compare_logy")

all_names = sorted({n for r in rows.index for n in labdata.scalar_names(lab, r, rows.at[r, "token"])})
shown = {p[2] for p in PANELS if p[1] == "scalar"}
extra = st.multiselect("more scalars", [n for n in all_names if n not in shown], key="compare_extra")
panels = PANELS + [(n, "scalar", n, False, None) for n in extra]

wanted = tuple(sorted({p[2] for p in panels if p[1] == "scalar"} | ({X_AXES[axis]} - {None})))
data = {r: labdata.scalars(lab, r, rows.at[r, "token"], wanted) for r in rows.index}
spectra = {r: labdata.spectrum_norms(lab, r, rows.at[r, "token"]) for r in rows.index}
events = {r: labdata.events(lab, r, rows.at[r, "token"]) for r in rows.index}

cols = st.columns(len(facets))
for i, (col, facet) in enumerate(zip(cols, facets)):
    members = rows[[facet_of[r] == i for r in rows.index]]
    col.metric(f"{facet}: diverged", f"{int((members['status'] == 'diverged').sum())} / {len(members)}")
    col.caption(f"max ρ(Ā) {members['max_rho'].max():.4f} · max ‖h_T‖ {members['max_state_norm'].max():.3g}")


def series(run_id: str, source: str, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    if source == "spectra":
        frame = spectra[run_id]
        return (frame["step"].to_numpy(), frame[name].to_numpy()) if len(frame) else None
    return data[run_id].get(name)


def to_x(run_id: str, steps: np.ndarray) -> np.ndarray | None:
    if X_AXES[axis] is None:
        return steps.astype(float)
    ref = data[run_id].get(X_AXES[axis])
    return None if ref is None else value_at(ref[0], ref[1], steps)


def export(parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], name: str) -> pd.DataFrame:
    """(run, step, x, value) rows of every run, built in one piece (the run column categorical)."""
    codes = np.repeat(np.arange(len(parts)), [len(p[1]) for p in parts])
    return pd.DataFrame({"run": pd.Categorical.from_codes(codes, [p[0] for p in parts]),
                         "step": np.concatenate([p[1] for p in parts]), axis: np.concatenate([p[2] for p in parts]),
                         name: np.concatenate([p[3] for p in parts])})


def seed_groups() -> dict[str, str]:
    """run id -> its seed group (experiment/sweep cell) when seeds are pooled and the cell
    has several runs; else the run id itself."""
    cells = {r: f"{rows.at[r, 'experiment']}/{rows.at[r, 'sweep_cell']}" for r in rows.index
             if seeds and isinstance(rows.at[r, "sweep_cell"], str)}
    sizes = pd.Series(list(cells.values())).value_counts()
    return {r: cells[r] if r in cells and sizes[cells[r]] > 1 else r for r in rows.index}


group = seed_groups()

missing_x = [r for r in rows.index if X_AXES[axis] is not None and X_AXES[axis] not in data[r]]
if missing_x:
    st.warning(f"{len(missing_x)} runs did not record `{X_AXES[axis]}`; they are left out. Use x axis = step.")

for title, source, name, _, hline in panels:
    panel = charts.Panel(title, facets, axis, log_x=log_x, log_y=title in log_y, hline=hline,
                         smoothed=halflife > 0)
    exports, bands = [], {}
    for r in rows.index:
        s = series(r, source, name)
        x = None if s is None else to_x(r, s[0])
        if x is None:
            continue
        steps, raw = s
        smooth = ema(steps, raw, halflife)
        exports.append((r, steps, x, raw))
        ev = events[r]
        at = ev["step"].to_numpy()
        points = list(zip(at.tolist(), ev["kind"].tolist(), ev["detail"].tolist()))
        panel.markers += charts.event_markers(group[r], facet_of[r], points, to_x(r, at), value_at(steps, smooth, at))
        if rows.at[r, "status"] == "diverged":
            panel.vlines.append((group[r], facet_of[r], float(to_x(r, np.array([rows.at[r, "status_step"]]))[0])))
        if group[r] == r:
            panel.curves.append(charts.Curve(r, r, facet_of[r], x, raw, smooth))
        else:
            bands.setdefault(group[r], []).append((r, steps, smooth))
    for key, members in bands.items():
        steps, mean, lower, upper = seed_band([(s, v) for _, s, v in members])
        x = to_x(members[0][0], steps)
        panel.curves.append(charts.Curve(key, f"{key} ({len(members)} seeds)", facet_of[members[0][0]], x,
                                         mean, mean, lower, upper))
    if not exports:
        st.caption(f"{title}: not recorded by these runs.")
        continue
    widgets.chart(charts.panel_figure(panel), export(exports, name), f"compare_{name}")
