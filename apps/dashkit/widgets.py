"""Streamlit pieces every page uses: a chart with its CSV, the run picker, the empty-lab page."""

from __future__ import annotations

import re

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashkit import session


def chart(fig: go.Figure, data: pd.DataFrame, name: str) -> None:
    """A plotly chart and a button that downloads its data, in full, as CSV. The CSV is made
    only when the button is clicked; `name` is its file name and the widgets' key."""
    st.plotly_chart(fig, key=f"chart:{name}", config={"displaylogo": False})
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    st.download_button(f"⬇ {slug}.csv", data=lambda: data.to_csv(index=False, na_rep="NaN"),
                       file_name=f"{slug}.csv", mime="text/csv", key=f"csv:{name}", on_click="ignore")


def run_picker(table: pd.DataFrame, key: str, label: str = "Run") -> str:
    """One run: the selected runs first (the first by default), then every other readable run."""
    chosen = session.selected()
    options = chosen + [r for r in table["run_id"] if r not in chosen]
    return st.selectbox(label, options, key=key)


def status_text(row) -> str:
    """'finished', 'running', 'running (no writer)', 'diverged @ 170: reason'."""
    if row.status == "running":
        return "running" if row.alive else "running (no writer)"
    if row.status in ("diverged", "failed"):
        return f"{row.status} @ {int(row.status_step)}: {row.status_reason}"
    return str(row.status)


def empty_lab(lab: str, exists: bool) -> None:
    """What to do when there is nothing to show: the commands that make a lab."""
    st.title("stabilitylab")
    if exists:
        st.info(f"The lab `{lab}` has no runs yet.")
    else:
        st.info(f"There is no lab at `{lab}`.")
    st.markdown(
        "A lab is a directory of runs written by the trainer. To make one and look at it:\n\n"
        "```bash\n"
        "make demo                         # train the quick Parcae-vs-unconstrained comparison, open it here\n"
        "stabilitylab dashboard PATH/TO/LAB   # open a lab you already have\n"
        "stabilitylab runs PATH/TO/LAB        # list its runs in the terminal\n"
        "```\n\n"
        "Or write runs yourself with the run store (`docs/store.md`):\n\n"
        "```python\n"
        "from stabilitylab.store import RunWriter\n"
        "with RunWriter.create(\"runs\", \"my-run\", config, experiment=\"mine\") as w:\n"
        "    w.log(step, {\"loss\": loss, \"h_T_norm\": h_norm})\n"
        "```\n\n"
        "Then type the lab's path in the sidebar.")
