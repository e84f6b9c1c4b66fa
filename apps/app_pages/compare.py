"""Compare, as in the run trackers: choose the experiment(s) first; runs are grouped by every
config field except the seed (or by the fields chosen) and each group is drawn as its mean
with a mean ± std (or min–max) band, N in the legend, its runs faint behind; columns put
unconstrained beside constrained injections on one y axis. Loss, gradient norm, ρ(Ā) with
the ρ = 1 line, max ‖h_T‖ and ‖e‖ over training, spikes and divergences marked. Below: the
config fields in which the shown runs differ, and the sweep as parallel coordinates."""

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import charts, names, session, story, widgets
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
BANDS = {"mean ± std": "std", "min–max": "range", "runs only": None}
DASHES = ("solid", "dot", "dash", "longdash", "dashdot", "longdashdot")
CONSTRAINT = "unconstrained | constrained"
PANEL_HEIGHT = 440
INJECTION = names.config_column("injection")


def facets_of(rows: pd.DataFrame, by: str) -> tuple[list[str], dict[str, int]]:
    """Column titles, and each run's column: by constraint (unconstrained left), by one
    config field, or one column."""
    if by == "none":
        return ["all runs"], {r: 0 for r in rows.index}
    if by == CONSTRAINT:
        kind = ["constrained" if story.constrained(v) else "unconstrained" for v in rows[INJECTION]]
        facets = [k for k in ("unconstrained", "constrained") if k in kind]
        return facets, {r: facets.index(k) for r, k in zip(rows.index, kind)}
    values = rows[by].map(story.fmt)
    facets = sorted(values.unique(), key=story.sortable)
    return facets, {r: facets.index(v) for r, v in zip(rows.index, values)}


lab, runs = session.lab(), session.runs()
st.title("Compare")
widgets.take_query({"experiment": "compare_linked"})
experiments = list(dict.fromkeys(runs["experiment"].dropna()))
linked = st.session_state.pop("compare_linked", None)
if linked:
    st.session_state["compare_mode"] = "experiments"
    st.session_state["compare_experiments"] = [e for e in linked.split(",") if e in experiments]
if "compare_experiments" not in st.session_state:
    pair = session.first_pair()
    first = runs.set_index("run_id").at[pair[0], "experiment"] if pair else experiments[0]
    st.session_state["compare_experiments"] = [first]

c = st.columns([1, 3])
mode = c[0].radio("runs", ["experiments", "selected runs"], key="compare_mode",
                  help="the runs of the chosen experiments, or the runs selected (Runs page, sidebar)")
if mode == "experiments":
    chosen = c[1].multiselect("experiments", experiments, key="compare_experiments",
                              help="choose the experiments first: their runs are grouped below")
    rows = runs[runs["experiment"].isin(chosen)].set_index("run_id", drop=False)
else:
    rows = runs[runs["run_id"].isin(session.selected())].set_index("run_id", drop=False)
if rows.empty:
    st.info("No runs to compare: choose an experiment, or select runs on the Runs page or in the sidebar.")
    st.stop()

fields = story.varying(rows)
scope = "|".join(sorted(rows["experiment"].dropna().unique()))
c = st.columns([3, 1.3, 1.2])
group_by = c[0].multiselect("group by", fields, default=fields, key=f"compare_group_{mode}_{scope}",
                            format_func=names.field_name,
                            help="runs that agree on these fields form one group (by default every config field "
                                 "but the seed: the seeds of one configuration)")
column_options = ([CONSTRAINT] if INJECTION in fields and len({story.constrained(v) for v in rows[INJECTION]}) > 1
                  else []) + [f for f in fields if f in group_by] + ["none"]
by = c[1].selectbox("columns", column_options, key=f"compare_columns_{mode}_{scope}",
                    format_func=names.field_name,
                    help="side by side on one y axis")
band = c[2].radio("band", list(BANDS), key="compare_band", help="the spread of each group's runs")
facets, facet_of = facets_of(rows, by)

c = st.columns([1.2, 2, 1, 1])
axis = c[0].radio("x axis", list(X_AXES), horizontal=True, key="compare_x")
longest = float(rows["last_step"].max())
auto = min(HALF_LIVES[1:], key=lambda h: abs(h - 0.01 * longest))  # about 1% of the longest run
halflife = c[1].select_slider("smoothing half-life (steps)", HALF_LIVES, value=auto, key="compare_smooth",
                              help="time-weighted EMA: uneven step gaps decay by their length")
members_shown = c[2].toggle("member runs", value=True, key="compare_members", help="each group's runs, faint")
log_x = c[3].toggle("log x", key="compare_logx")
c = st.columns(2)
log_y = c[0].multiselect("log y", [p[0] for p in PANELS], [p[0] for p in PANELS if p[3]], key="compare_logy")
keys = tuple(zip(rows["run_id"], rows["token"]))
base = tuple(sorted({p[2] for p in PANELS if p[1] == "scalar"} | ({X_AXES[axis]} - {None})))
all_names = sorted({n for b in labdata.bundle(lab, keys, base).values() for n in b["names"]})
shown = {p[2] for p in PANELS if p[1] == "scalar"}
extra = c[1].multiselect("more scalars", [n for n in all_names if n not in shown], key="compare_extra")
panels = PANELS + [(n, "scalar", n, False, None) for n in extra]

records_ = rows[group_by].to_dict("index") if group_by else {}
group_key = {r: story.label(records_[r], group_by) if group_by else r for r in rows.index}
sizes = pd.Series(group_key).value_counts()
group_label = {g: f"{g} (N={n})" for g, n in sizes.items()}
# several grouping fields: colour by the first (the injection), dash by the others (the LR)
style = {}
if len(group_by) > 1:
    firsts = {r: story.label(records_[r], group_by[:1]) for r in rows.index}
    rests = {r: story.label(records_[r], group_by[1:]) for r in rows.index}
    order = sorted(set(rests.values()), key=lambda v: [story.sortable(p) for p in v.split(", ")])
    style = {group_key[r]: (firsts[r], DASHES[order.index(rests[r]) % len(DASHES)]) for r in rows.index}

wanted = tuple(sorted({p[2] for p in panels if p[1] == "scalar"} | ({X_AXES[axis]} - {None})))
read = labdata.bundle(lab, keys, wanted)
data = {r: b["scalars"] for r, b in read.items()}
spectra = {r: b["spectra"] for r, b in read.items()}
events = {r: b["events"] for r, b in read.items()}
status, status_step = rows["status"].to_dict(), rows["status_step"].to_dict()

cols = st.columns(len(facets))
for i, (col, facet) in enumerate(zip(cols, facets)):
    members = rows[[facet_of[r] == i for r in rows.index]]
    col.metric(f"{facet}: diverged", f"{int((members['status'] == 'diverged').sum())} / {len(members)}")
    col.caption(f"max ρ(Ā) {members['max_rho'].max():.4f} · max ‖h_T‖ {members['max_state_norm'].max():.3g}"
                f" · {members['run_id'].map(group_key).nunique()} groups")


def series(run_id: str, source: str, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    if source == "spectra":
        frame = spectra[run_id]
        return (frame["step"], frame[name]) if len(frame["step"]) else None
    return data[run_id].get(name)


def to_x(run_id: str, steps: np.ndarray) -> np.ndarray | None:
    if X_AXES[axis] is None:
        return steps.astype(float)
    ref = data[run_id].get(X_AXES[axis])
    return None if ref is None else value_at(ref[0], ref[1], steps)


def export(parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], name: str) -> pd.DataFrame:
    """(run, group, step, x, value) rows of every run, built in one piece (run and group categorical)."""
    codes = np.repeat(np.arange(len(parts)), [len(p[1]) for p in parts])
    ids = [p[0] for p in parts]
    return pd.DataFrame({"run": pd.Categorical.from_codes(codes, ids),
                         "group": pd.Categorical([group_key[r] for r in ids])[codes],
                         "step": np.concatenate([p[1] for p in parts]), axis: np.concatenate([p[2] for p in parts]),
                         name: np.concatenate([p[3] for p in parts])})


missing_x = [r for r in rows.index if X_AXES[axis] is not None and X_AXES[axis] not in data[r]]
if missing_x:
    st.warning(f"{len(missing_x)} runs did not record `{X_AXES[axis]}`; they are left out. Use x axis = step.")

spread = BANDS[band]


def style_of(key: str) -> dict:
    color_key, dash = style.get(key, (None, "solid"))
    return {"color_key": color_key, "dash": dash}


for title, source, name, _, hline in panels:
    panel = charts.Panel(title, facets, axis, log_x=log_x, log_y=title in log_y, hline=hline,
                         smoothed=halflife > 0, height=PANEL_HEIGHT, legend_right=True)
    exports, groups = [], {}
    for r in rows.index:
        s = series(r, source, name)
        x = None if s is None else to_x(r, s[0])
        if x is None:
            continue
        steps, raw = s
        smooth = ema(steps, raw, halflife)
        exports.append((r, steps, x, raw))
        at, kinds, details = events[r]
        points = list(zip(at.tolist(), kinds, details))
        panel.markers += charts.event_markers(group_key[r], facet_of[r], points, to_x(r, at),
                                              value_at(steps, smooth, at))
        if status[r] == "diverged":
            panel.vlines.append((group_key[r], facet_of[r], float(to_x(r, np.array([status_step[r]]))[0])))
        groups.setdefault(group_key[r], []).append((r, steps, x, raw, smooth))
    for key, members in groups.items():
        facet = facet_of[members[0][0]]
        if len(members) == 1 or spread is None:
            for r, steps, x, raw, smooth in members:
                label = group_label[key] if len(members) == 1 else f"{group_label[key]}: {r}"
                panel.curves.append(charts.Curve(key, label, facet, x, raw, smooth, **style_of(key)))
            continue
        steps, mean, lower, upper = seed_band([(s, v) for _, s, _, _, v in members], spread)
        x = to_x(members[0][0], steps)
        faint = [(mx, mv) for _, _, mx, _, mv in members] if members_shown else []
        panel.curves.append(charts.Curve(key, group_label[key], facet, x, mean, mean, lower, upper, faint,
                                         **style_of(key)))
    if not exports:
        st.caption(f"{title}: not recorded by these runs.")
        continue
    widgets.chart(charts.panel_figure(panel), export(exports, name), f"compare_{name}")

st.subheader("Config")
only = st.toggle("differences only", value=True, key="compare_diff_only",
                 help="only the config fields whose value differs between the shown runs (seed included)")
columns = story.varying(rows, seeds=True) if only else story.config_columns(rows)
table = rows[columns].astype(str).rename(columns=names.field_name)
st.dataframe(table.assign(group=[group_key[r] for r in rows.index], seed=rows["seed"], status=rows["status"]),
             key="compare_config", column_order=["group", "seed", "status", *table.columns])

grid = fields  # the fields that vary among the shown runs, seeds aside
parallel = st.toggle("the sweep as parallel coordinates", key="compare_parallel", disabled=not grid or len(rows) < 2,
                     help="grid fields → final loss, max ρ(Ā), status; drawn on demand (plotly draws it with "
                          "WebGL, seconds in a browser without a GPU)")
if parallel and grid and len(rows) > 1:
    dims = []
    for f in grid:
        values = rows[f]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            numeric = values.to_numpy(float)
            dims.append({"label": story.short(f), "values": np.log10(numeric) if (numeric > 0).all() and
                         numeric.max() / numeric.min() > 20 else numeric})
            if dims[-1]["values"] is not numeric:
                dims[-1]["label"] = f"log10 {story.short(f)}"
        else:
            levels = sorted(values.map(story.fmt).unique(), key=story.sortable)
            dims.append({"label": story.short(f), "values": [levels.index(v) for v in values.map(story.fmt)],
                         "tickvals": list(range(len(levels))), "ticktext": levels})
    status_levels = ["finished", "running", "diverged", "failed"]
    dims += [{"label": "final loss", "values": rows["final_loss"].to_numpy(float)},
             {"label": "max ρ(Ā)", "values": rows["max_rho"].to_numpy(float)},
             {"label": "status", "values": [status_levels.index(s) if s in status_levels else 0 for s in rows["status"]],
              "tickvals": list(range(len(status_levels))), "ticktext": status_levels}]
    widgets.chart(charts.parallel_figure(f"{len(rows)} runs: grid fields → final loss, max ρ(Ā), status", dims,
                                         rows["final_loss"].to_numpy(float), "final loss"),
                  rows[["run_id", *grid, "final_loss", "max_rho", "status"]], "compare_parallel")
