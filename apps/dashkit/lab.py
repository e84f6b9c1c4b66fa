"""The dashboard's reads of the lab: st.cache_data over stabilitylab.store.

Every cached read takes the run's token (Run.token(): mtime and size of its database), so
a cache entry is reused until the run commits something, then read again. The runs table
is keyed by lab_token, which changes when a run is added, removed or grows. Nothing here
writes to the lab.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashkit import names, story
from stabilitylab import records, store

REFERENCE_LAB = Path(__file__).resolve().parents[2] / "data" / "reference-lab"
CACHE = dict(show_spinner=False, max_entries=512)


def lab_token(lab: str) -> str | None:
    """The lab's cache key, or None when the directory does not exist: a digest of
    store.lab_token (hashing the tuple itself, ~1500 objects for 107 runs, cost st.cache_data
    0.1–0.2 s per cached call)."""
    try:
        token = store.lab_token(lab)
    except store.StoreError:
        return None
    return digest(token)


@st.cache_data(**CACHE)
def _runs_table(lab: str, token: str) -> pd.DataFrame:
    table = store.list_runs(lab)
    for role in ("injection", "lr", "mu_rec"):  # a lab whose runs never set these still has the columns
        if names.config_column(role) not in table:
            table[names.config_column(role)] = None
    return table


def runs_table(lab: str, token: str | None) -> pd.DataFrame | None:
    """list_runs of the lab (readable and unreadable runs) at `token` (lab_token), or None
    if it does not exist."""
    return None if token is None else _runs_table(lab, token)


def readable(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["readable"].astype(bool)].reset_index(drop=True)


def run(lab: str, run_id: str) -> store.Run:
    return store.Run(Path(lab) / run_id, run_id)


@st.cache_data(**CACHE)
def scalar_names(lab: str, run_id: str, token: tuple) -> list[str]:
    return run(lab, run_id).scalar_names()


@st.cache_data(**CACHE)
def scalars(lab: str, run_id: str, token: tuple, wanted: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (steps, values) at full resolution, for the wanted names this run logged
    (one columnar read: Run.scalar_series)."""
    return run(lab, run_id).scalar_series(wanted)


@st.cache_data(**CACHE)
def spectra(lab: str, run_id: str, token: tuple) -> pd.DataFrame:
    return run(lab, run_id).spectra()


@st.cache_data(**CACHE)
def spectrum_norms(lab: str, run_id: str, token: tuple) -> pd.DataFrame:
    """ρ(Ā) and the norms per spectrum step, without the eigenvalues: what curves over
    training need, a tenth of the bytes to keep in the cache, and the blobs never read."""
    return run(lab, run_id).spectra(eigenvalues=False)


@st.cache_data(**CACHE)
def traces(lab: str, run_id: str, token: tuple) -> dict[str, store.Trace]:
    return run(lab, run_id).traces()


@st.cache_data(**CACHE)
def evals(lab: str, run_id: str, token: tuple) -> pd.DataFrame:
    return run(lab, run_id).evals()


@st.cache_data(**CACHE)
def events(lab: str, run_id: str, token: tuple) -> pd.DataFrame:
    return run(lab, run_id).events()


@st.cache_data(**CACHE)
def analysis(lab: str, run_id: str, token: tuple) -> pd.DataFrame:
    return run(lab, run_id).analysis()


@st.cache_data(**CACHE)
def sweep_points(lab: str, runs: tuple[tuple[str, tuple], ...]) -> pd.DataFrame:
    """The scaling-law points of (run_id, token) runs: analysis.sweep.sweep_points, the very
    points `stabilitylab fit --lab` fits (N = N_static + μ_rec · N_core)."""
    from stabilitylab.analysis import sweep  # imported here: the config layer is needed by this page alone

    return sweep.sweep_points(run(lab, run_id) for run_id, _ in runs)


@st.cache_data(**CACHE)
def details(lab: str, run_id: str, token: tuple) -> dict:
    """meta (with the config), status history, results and checkpoints of one run."""
    r = run(lab, run_id)
    return {"meta": r.meta(), "status": r.status_history(), "results": r.results(), "checkpoints": r.checkpoints()}


@st.cache_data(**CACHE)
def extras(lab: str, run_id: str, token: tuple) -> dict:
    """What the runs table lacks for a run's verdict: λ₁ (the largest Lyapunov exponent of
    its last analysis probe) and its number of loss spikes."""
    r = run(lab, run_id)
    lyapunov = r.analysis(names.ANALYSIS["lyapunov"])
    events = r.events()
    return {"lambda1": float(lyapunov["values"].iloc[-1][0]) if len(lyapunov) else np.nan,
            "spikes": int((events["kind"] == records.SPIKE).sum())}


def extras_table(lab: str, runs: pd.DataFrame) -> pd.DataFrame:
    """extras() of every run, indexed by run id (each run cached by its own token)."""
    return pd.DataFrame([extras(lab, r, t) for r, t in zip(runs["run_id"], runs["token"])],
                        index=pd.Index(runs["run_id"], name="run_id"))


@st.cache_data(**CACHE)
def first_pair(lab: str, token: str) -> tuple[str, str] | None:
    """The lab's headline pair (story.first_pair): unconstrained, constrained."""
    return story.first_pair(readable(_runs_table(lab, token)))


@st.cache_data(**CACHE)
def lab_story(lab: str, token: str) -> dict:
    """The lab's story (dashkit.story), computed once per lab state: per experiment its
    grid fields, matched pairs (each with its table of both sides and verdicts, and a
    summary line) and outcome map; the headline pair; every run's extras."""
    runs = readable(_runs_table(lab, token))
    extra = extras_table(lab, runs)
    experiments = list(dict.fromkeys(runs["experiment"].dropna()))
    out = {"experiments": experiments, "first_pair": first_pair(lab, token), "extras": extra,
           "grid": {}, "pairs": {}, "outcomes": {}}
    for e in experiments:
        out["grid"][e] = story.grid_fields(runs[runs["experiment"] == e])
        out["pairs"][e] = [(f"{p.left_value} vs {p.right_value}", story.summary_line(runs, p),
                            story.pair_table(runs, p, extra)) for p in story.matched_pairs(runs, e)]
        out["outcomes"][e] = story.outcome_grid(runs, extra, e)
    return out


@st.cache_data(**CACHE)
def fittable(lab: str, token: str, law: str) -> pd.DataFrame:
    """fits.fittable over the lab's readable runs, once per lab state and law."""
    from dashkit import fits  # imported here: scipy (1.5 s) is for the Scaling laws page alone

    return fits.fittable(readable(_runs_table(lab, token)), law)


def digest(value) -> str:
    """A short cache key for a long tuple (st.cache_data hashes every element, ~0.1 ms each)."""
    return hashlib.blake2b(repr(value).encode(), digest_size=16).hexdigest()


def bundle(lab: str, runs: tuple[tuple[str, tuple], ...], wanted: tuple[str, ...]) -> dict[str, dict]:
    """_bundle keyed by a digest of the runs and their tokens."""
    return _bundle(lab, digest(runs), wanted, runs)


@st.cache_resource(max_entries=32, show_spinner=False)
def _bundle(lab: str, key: str, wanted: tuple[str, ...], _runs: tuple[tuple[str, tuple], ...]) -> dict[str, dict]:
    """What a Compare view draws of each of (run_id, token) runs, in one cached value of
    plain arrays: scalar names, the wanted scalars, the spectrum columns (step, ρ(Ā), norms)
    and the events (step, kind, detail). Each run is read through its own cached reads (a
    live run that grows is read again alone). A warm page then hashes one key and gets one
    shared value (cache_resource: no copy; callers only read it) instead of unpickling four
    frames per run (~0.5 s for the 50 runs of a sweep)."""
    out = {}
    for r, t in _runs:
        spectra = spectrum_norms(lab, r, t)
        ev = events(lab, r, t)
        out[r] = {"names": scalar_names(lab, r, t), "scalars": scalars(lab, r, t, wanted),
                  "spectra": {c: spectra[c].to_numpy() for c in spectra.columns},
                  "events": (ev["step"].to_numpy(), ev["kind"].tolist(), ev["detail"].tolist())}
    return out
