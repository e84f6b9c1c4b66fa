"""What the user is looking at, shared by every page through st.session_state:
the lab ("lab"), the selected run ids ("selected")."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashkit import lab as labdata

LAB, SELECTED, TOKEN = "lab", "selected", "lab_token"


def lab() -> str:
    return st.session_state[LAB]


def lab_token() -> str:
    """The lab's token as the entry script read it for this run of the app (one directory
    walk per rerun, not one per page element)."""
    return st.session_state[TOKEN]


def table() -> pd.DataFrame:
    """Every run of the current lab, readable or not (cached per lab token)."""
    return labdata.runs_table(lab(), lab_token())


def runs() -> pd.DataFrame:
    """The readable runs of the current lab (the entry script shows pages only when there are some)."""
    return labdata.readable(table())


def story() -> dict:
    """The lab's story (lab.lab_story), cached per lab token."""
    return labdata.lab_story(lab(), lab_token())


def selected() -> list[str]:
    return list(st.session_state.get(SELECTED, []))


def token(table: pd.DataFrame, run_id: str) -> tuple:
    """The run's cache token as listed in the (cached) runs table."""
    return table.loc[table["run_id"] == run_id, "token"].iloc[0]


def first_pair() -> tuple[str, str] | None:
    """The lab's headline pair: an unconstrained run and its constrained twin."""
    return labdata.first_pair(lab(), lab_token())
