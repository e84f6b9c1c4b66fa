"""The stabilitylab dashboard: `streamlit run apps/dashboard.py -- --lab PATH`
(or `stabilitylab dashboard [PATH]`). Without a path it opens the reference lab in
data/reference-lab. Pages live in apps/app_pages/; this script holds what they share:
the lab, the selected runs (st.session_state), live refresh and the navigation.
"""

import argparse
import sys

import streamlit as st

from dashkit import lab as labdata
from dashkit import session, widgets

REFRESH_SECONDS = 2.0
PAGES = [("app_pages/overview.py", "Overview", ":material/home:"),
         ("app_pages/runs.py", "Runs", ":material/table_rows:"),
         ("app_pages/compare.py", "Compare", ":material/compare_arrows:"),
         ("app_pages/loop.py", "Loop dynamics", ":material/all_inclusive:"),
         ("app_pages/spectra.py", "Spectra", ":material/scatter_plot:"),
         ("app_pages/scaling.py", "Scaling laws", ":material/trending_down:"),
         ("app_pages/architecture.py", "Architecture", ":material/account_tree:")]


def lab_argument() -> str:
    """--lab PATH from `streamlit run apps/dashboard.py -- --lab PATH`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--lab", default=str(labdata.REFERENCE_LAB))
    return parser.parse_known_args(sys.argv[1:])[0].lab


def watch(lab: str, token: str) -> None:
    """Rerun the app when the lab has changed since this page was drawn (a run grew).
    A fragment's rerun names the page the browser believes it is on; so the fragment is
    made after st.navigation, whose message tells the browser the page (made before it, a
    watch firing while the first run was still resolving /compare named no page, and its
    st.rerun landed on the Overview)."""
    if labdata.lab_token(lab) != token:
        st.rerun()


st.set_page_config(page_title="stabilitylab", page_icon=":material/all_inclusive:", layout="wide")
if session.LAB not in st.session_state:
    st.session_state[session.LAB] = lab_argument()
with st.sidebar:
    lab = st.text_input("Lab", key=session.LAB, help="a directory of runs (run store)")
    token = st.session_state[session.TOKEN] = labdata.lab_token(lab)
    table = labdata.runs_table(lab, token)

if table is None or table.empty:
    st.navigation([st.Page(lambda: widgets.empty_lab(lab, exists=table is not None), title="Get started",
                           icon=":material/info:")]).run()
    st.stop()

runs = labdata.readable(table)
with st.sidebar:
    unreadable = len(table) - len(runs)
    st.caption(f"{len(runs)} runs" + (f", {unreadable} unreadable (see Runs)" if unreadable else ""))
    ids = runs["run_id"].tolist()
    st.session_state[session.SELECTED] = [r for r in session.selected() if r in ids]
    st.multiselect("Selected runs", ids, key=session.SELECTED, help="carried to every page",
                   on_change=lambda: st.session_state.pop(widgets.PAIR, None))
    live = st.toggle("Live refresh", value=bool(runs["alive"].any()), key="live",
                     help=f"redraw when a run grows (checked every {REFRESH_SECONDS:g} s)")

page = st.navigation([st.Page(path, title=title, icon=icon, default=i == 0)
                      for i, (path, title, icon) in enumerate(PAGES)])
if live:  # after st.navigation: the browser knows the page before the watch's first rerun (see watch)
    with st.sidebar:
        st.fragment(watch, run_every=REFRESH_SECONDS)(lab, token)
page.run()
