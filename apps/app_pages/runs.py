"""Runs: every run of the lab in one filterable table; the rows you select are carried to
the other pages. Unreadable runs are listed with the reason; one run's details below."""

import json

import pandas as pd
import streamlit as st

from dashkit import lab as labdata
from dashkit import names, session, story, widgets

COLUMNS = {"run_id": "run", "experiment": "experiment", "injection": "injection", "lr": "LR", "seed": "seed",
           "status_text": "status", "last_step": "steps", "final_loss": "final loss", "max_rho": "max ρ(Ā)",
           "max_state_norm": "max ‖h_T‖", "started_at": "started"}


def summary(table: pd.DataFrame) -> pd.DataFrame:
    out = table.assign(injection=table[names.config_column("injection")], lr=table[names.config_column("lr")],
                       status_text=[widgets.status_text(r) for r in table.itertuples()],
                       final_loss=story.losses_shown(table))
    out = out.astype({"seed": "Int64", "last_step": "Int64"})
    return out[list(COLUMNS)].rename(columns=COLUMNS)


def select_rows(shown: list[str]) -> None:
    """Table selection -> st.session_state.selected (selected runs hidden by the filters stay)."""
    rows = st.session_state["runs_table"].selection.rows
    hidden = [r for r in session.selected() if r not in shown]
    st.session_state[session.SELECTED] = hidden + [shown[i] for i in rows]


lab = session.lab()
table = session.table()
runs = labdata.readable(table)
st.title("Runs")
st.caption(f"lab `{lab}`")

status = runs["status"]
cols = st.columns(5)
cols[0].metric("runs", len(runs))
cols[1].metric("finished", int((status == "finished").sum()))
cols[2].metric("diverged", int((status == "diverged").sum()))
cols[3].metric("running", int((status == "running").sum()))
cols[4].metric("unreadable", len(table) - len(runs))

view = summary(runs)
with st.expander("Filters", expanded=True):
    f = st.columns(4)
    for col, column in zip(f, ("experiment", "injection")):
        values = sorted(view[column].dropna().astype(str).unique())
        chosen = col.multiselect(column, values, key=f"filter_{column}")
        if chosen:
            view = view[view[column].astype(str).isin(chosen)]
    statuses = f[2].multiselect("status", list(dict.fromkeys(runs["status"])), key="filter_status")
    if statuses:
        view = view[runs.loc[view.index, "status"].isin(statuses)]
    text = f[3].text_input("run id contains", key="filter_text")
    if text:
        view = view[view["run"].str.contains(text, regex=False)]

shown = view["run"].tolist()
unstable = view.style.map(lambda v: "color: crimson; font-weight: bold" if v >= 1 else "", subset=["max ρ(Ā)"])
st.dataframe(unstable, hide_index=True, key="runs_table", placeholder="NaN", on_select=lambda: select_rows(shown),
             selection_mode="multi-row",
             selection_default={"selection": {"rows": [i for i, r in enumerate(shown) if r in session.selected()]}},
             column_config={"LR": st.column_config.NumberColumn(format="%.2e"),
                            "final loss": st.column_config.NumberColumn(
                                format="%.4f", help="the last loss logged; where that was NaN or inf (a diverged "
                                                    "run), the last finite one"),
                            "max ρ(Ā)": st.column_config.NumberColumn(format="%.4f"),
                            "max ‖h_T‖": st.column_config.NumberColumn(format="%.3e")})
st.download_button("⬇ runs.csv", data=lambda: runs.to_csv(index=False), file_name="runs.csv", mime="text/csv",
                   key="csv:runs", on_click="ignore")
st.caption("Select rows to carry them to Compare, Loop dynamics, Spectra and Architecture "
           "(also in the sidebar). ρ(Ā) ≥ 1 means the linearised loop is unstable.")

bad = table[~table["readable"].astype(bool)]
if len(bad):
    st.subheader("Unreadable runs")
    for row in bad.itertuples():
        st.error(f"**{row.run_id}** — {row.error}")

if len(runs):
    st.subheader("Details")
    run_id = widgets.run_picker(runs, key="details_run")
    info = labdata.details(lab, run_id, session.token(runs, run_id))
    tabs = st.tabs(["status", "events", "config", "results", "checkpoints"])
    tabs[0].dataframe(info["status"].assign(time=pd.to_datetime(info["status"]["time"], unit="s")), hide_index=True)
    tabs[1].dataframe(labdata.events(lab, run_id, session.token(runs, run_id)), hide_index=True)
    tabs[2].json(info["meta"].get("config", {}))
    tabs[2].caption(json.dumps({k: v for k, v in info["meta"].items() if k != "config"}))
    tabs[3].json(info["results"])
    tabs[4].dataframe(info["checkpoints"], hide_index=True)
