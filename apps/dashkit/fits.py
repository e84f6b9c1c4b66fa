"""Scaling-law fits: the one place the dashboard calls stabilitylab.analysis.scaling.

That module is being merged to main; until it is there, `available()` is False and the
pages say so instead of fitting (Loop dynamics still draws the depth curve's data).
`available()` looks for the file rather than importing: importing stabilitylab.analysis
runs its __init__, which loads torch (spectra, Lyapunov).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

import stabilitylab

SCALING = Path(stabilitylab.__file__).parent / "analysis" / "scaling.py"

TEST_TIME = "test-time (exp)"  # PARCAE.md C5: the best test-time form, the default everywhere
MISSING = "Fitted laws need stabilitylab.analysis.scaling, which is not on this branch yet."


def available() -> bool:
    return SCALING.is_file()


def laws() -> dict:
    """Law name -> scaling.Law: the four test-time forms, Chinchilla, training, unified."""
    from stabilitylab.analysis import scaling

    return {**{f"test-time ({form})": law for form, law in scaling.TEST_TIME_FORMS.items()},
            "chinchilla": scaling.CHINCHILLA, "training": scaling.TRAINING, "unified": scaling.UNIFIED}


@st.cache_resource(max_entries=64, show_spinner="fitting …")
def fit(law: str, points: pd.DataFrame, holdout: tuple[bool, ...] = (), bootstrap: int = 100):
    """laws()[law] fitted to `points` (a column per law input, and L); `holdout` masks the
    points left out of the fit (their error is held_out_error). Cached: a Fit is immutable."""
    from stabilitylab.analysis import scaling

    spec = laws()[law]
    mask = np.array(holdout, dtype=bool) if holdout else None
    return scaling.fit_law(spec, points["L"].to_numpy(float), holdout=mask, bootstrap=bootstrap,
                           **{name: points[name].to_numpy(float) for name in spec.inputs})


def params_table(result) -> pd.DataFrame:
    """Each parameter with its bootstrap interval (NaN without bootstrap)."""
    rows = [(name, value, *result.intervals.get(name, (np.nan, np.nan))) for name, value in result.params.items()]
    return pd.DataFrame(rows, columns=["parameter", "value", "lower", "upper"])
