"""Scaling-law fits: the one place the dashboard calls stabilitylab.analysis.scaling
(numpy and scipy only, so the dashboard still never imports torch)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import names
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


# config fields that change N(μ_rec) (config/sizes.py) and D (the tokens a run sees)
SIZE_FIELDS = ("model.mean_recurrence", "model.d_model", "model.n_core", "model.n_prelude", "model.n_coda",
               "model.d_state", "model.d_mlp", "model.vocab_size", "model.looped")
DATA_FIELDS = ("train.steps", "train.flop_budget", "train.batch_size", "data.seq_len", "train.grad_accum")


def _depths(row) -> set[int]:
    """The test depths a run evaluates: config.train.eval_depths with 'mu', '2mu', … resolved."""
    mu = row.get(names.config_column("mu_rec")) or 1
    out = set()
    for d in row.get(names.config_column("eval_depths")) or []:
        if isinstance(d, str) and d.endswith("mu"):
            out.add(int((int(d[:-2]) if d[:-2] else 1) * mu))
        elif isinstance(d, (int, float)):
            out.add(int(d))
    return out


def fittable(runs: pd.DataFrame, law: str) -> pd.DataFrame:
    """Which experiments can this law be fitted to, from the runs table alone (no reads):
    one row per experiment with ok, score (higher: more to fit) and why not. The test-time
    law needs one model evaluated at many depths; the N, D laws need finished runs that
    differ in size and in data; the unified law both."""
    spec = LAWS[law]
    rows = []
    for experiment, members in runs.groupby("experiment", sort=False):
        done = members[members["status"] == "finished"]  # as `stabilitylab fit --lab` fits them
        column = names.config_column("eval_depths")
        known = column in done and done[column].notna().any()
        depths = [len(_depths(r)) for r in done.to_dict("records")] if known else []
        n_T = max(depths, default=0)
        n_N = done[[c for f in SIZE_FIELDS if (c := names.PREFIX + f) in done]].astype(str).drop_duplicates()
        n_D = done[[c for f in DATA_FIELDS if (c := names.PREFIX + f) in done]].astype(str).drop_duplicates()
        need = len(spec.params) + 1  # one point more than the parameters: a fit, not an interpolation
        why = []
        if done.empty:
            why.append("no finished run")
        depth_need = need if spec.inputs == ("T",) else 2  # L(T) per run; the others across runs
        if "T" in spec.inputs and known and n_T < depth_need:
            why.append(f"{n_T} test depths per run (needs ≥ {depth_need})")
        if "N" in spec.inputs and len(n_N) < 2:
            why.append("one model size (N does not vary)")
        if "D" in spec.inputs and len(n_D) < 2:
            why.append("one training length (D does not vary)")
        if not known:  # the configs do not say which depths: count runs, let the fit tell
            points = len(done)
        elif spec.inputs == ("T",):
            points = n_T
        else:
            points = len(done) * (sum(depths) / len(depths) if "T" in spec.inputs and depths else 1)
        if spec.inputs != ("T",) and known and points < need:
            why.append(f"{int(points)} points for {len(spec.params)} parameters")
        rows.append({"experiment": experiment, "ok": not why, "score": points, "finished runs": len(done),
                     "test depths": n_T if known else None, "why not": "; ".join(why)})
    return pd.DataFrame(rows, columns=["experiment", "ok", "score", "finished runs", "test depths", "why not"])


def best_experiment(table: pd.DataFrame) -> str | None:
    """The experiment with the most to fit among those that can be fitted (None: none can)."""
    ok = table[table["ok"]]
    return None if ok.empty else str(ok.sort_values("score", ascending=False, kind="stable")["experiment"].iloc[0])
