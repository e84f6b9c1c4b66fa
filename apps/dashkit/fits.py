"""Scaling-law fits: the one place the dashboard calls stabilitylab.analysis.scaling
(numpy and scipy only, so the dashboard still never imports torch)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from stabilitylab.analysis import scaling

LAWS = {**{f"test-time ({form})": law for form, law in scaling.TEST_TIME_FORMS.items()},
        "chinchilla": scaling.CHINCHILLA, "training": scaling.TRAINING, "unified": scaling.UNIFIED}
TEST_TIME = "test-time (exp)"  # docs/parcae.md §3 C5: the best test-time form, the default everywhere


@st.cache_resource(max_entries=64, show_spinner="fitting …")
def fit(law: str, points: pd.DataFrame, holdout: tuple[bool, ...] = (), bootstrap: int = 100) -> scaling.Fit:
    """LAWS[law] fitted to `points` (a column per law input, and L); `holdout` masks the
    points left out of the fit (their error is held_out_error). Cached: a Fit is immutable."""
    spec = LAWS[law]
    mask = np.array(holdout, dtype=bool) if holdout else None
    return scaling.fit_law(spec, points["L"].to_numpy(float), holdout=mask, bootstrap=bootstrap,
                           **{name: points[name].to_numpy(float) for name in spec.inputs})


def params_table(result: scaling.Fit) -> pd.DataFrame:
    """Each parameter with its bootstrap interval (NaN without bootstrap)."""
    rows = [(name, value, *result.intervals.get(name, (np.nan, np.nan))) for name, value in result.params.items()]
    return pd.DataFrame(rows, columns=["parameter", "value", "lower", "upper"])
