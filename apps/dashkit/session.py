"""What the user is looking at, shared by every page through st.session_state:
the lab ("lab"), the selected run ids ("selected")."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashkit import lab as labdata

LAB, SELECTED = "lab", "selected"


def lab() -> str:
    return st.session_state[LAB]


def runs() -> pd.DataFrame:
    """The readable runs of the current lab (the entry script shows pages only when there are some)."""
    return labdata.readable(labdata.runs_table(lab()))


def selected() -> list[str]:
    return list(st.session_state.get(SELECTED, []))


def token(table: pd.DataFrame, run_id: str) -> tuple:
    """The run's cache token as listed in the (cached) runs table."""
    return table.loc[table["run_id"] == run_id, "token"].iloc[0]
