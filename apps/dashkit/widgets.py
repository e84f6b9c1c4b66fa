"""Streamlit pieces every page uses: a chart with its CSV, the run picker, the empty-lab page."""

from __future__ import annotations

import re

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashkit import session


class _Prebuilt(go.Figure):
    """A figure dict that st.plotly_chart takes as a go.Figure: it asks a figure for
    to_dict() and sends that as it is, where a plain dict would be rebuilt with full
    validation (~2 s for a Compare page)."""

    def __init__(self, spec: dict):
        super().__init__()
        self._spec = spec

    def to_dict(self) -> dict:
        return self._spec


def chart(fig: go.Figure | dict, data: pd.DataFrame, name: str) -> None:
    """A plotly chart (a go.Figure, or a figure dict as charts.figure_dict makes) and a button that downloads its data, in full, as CSV. The CSV is made
    only when the button is clicked; `name` is its file name and the widgets' key."""
    st.plotly_chart(fig if isinstance(fig, go.Figure) else _Prebuilt(fig), key=f"chart:{name}",
                    config={"displaylogo": False})
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


def link(page: str, label: str, **params: str) -> None:
    """A link to another page that opens it on a selection: apps/app_pages/<page>.py with
    query parameters the page reads once (take_query)."""
    st.page_link(f"app_pages/{page}.py", label=label, query_params=params or None)


def take_query(keys: dict[str, str]) -> dict[str, str]:
    """The query parameters a link brought (parameter -> value), for the given parameter ->
    session key map: each value is put under its session key, then the URL is cleared, so
    the widgets the page draws next start there and the user's own choices win afterwards."""
    found = {p: st.query_params[p] for p in keys if p in st.query_params}
    for p, value in found.items():
        st.session_state[keys[p]] = value
    if found:
        st.query_params.clear()
    return found


PAIR = "pair"  # the two runs shown side by side on Loop dynamics, Spectra and Architecture


def pair_picker(table: pd.DataFrame, page: str, default: tuple[str, str] | None) -> tuple[str, str]:
    """Two runs, left and right, kept across the pages in st.session_state["pair"]. Starts
    from (in this order) a link's `runs=a,b`, the pair last chosen, the selected runs (the
    first two; one selected run goes left of the headline pair's other side), the lab's
    headline pair (unconstrained left, constrained right), the first two runs."""
    ids = table["run_id"].tolist()
    take_query({"runs": PAIR})
    pair = st.session_state.get(PAIR)
    if isinstance(pair, str):
        pair = tuple(pair.split(","))
    chosen = [r for r in session.selected() if r in ids]
    picked = tuple(chosen[:2]) if len(chosen) >= 2 else \
        (chosen[0], next(r for r in (*(default or ()), *ids) if r != chosen[0])) if chosen and len(ids) > 1 else None
    for candidate in (pair, picked, default, tuple(ids[:2])):
        if candidate and len(candidate) == 2 and all(r in ids for r in candidate):
            pair = tuple(candidate)
            break
    else:
        pair = (ids[0], ids[0])
    st.session_state[PAIR] = pair
    for side, run_id in zip(("left", "right"), pair):
        st.session_state[f"{page}_{side}"] = run_id

    def remember():
        st.session_state[PAIR] = (st.session_state[f"{page}_left"], st.session_state[f"{page}_right"])

    c = st.columns(2)
    left = c[0].selectbox("Left run", ids, key=f"{page}_left", on_change=remember)
    right = c[1].selectbox("Right run", ids, key=f"{page}_right", on_change=remember)
    return left, right
