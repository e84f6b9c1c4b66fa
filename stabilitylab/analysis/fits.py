"""Scaling laws fitted to a lab's runs, and where the fits are kept: `stabilitylab fit --lab`.

    points = lab_points(lab, experiment)                 # sweep_points of the lab's finished runs
    fits = fit_depth_curves(points.done, ["exp"])         # test-time law, one fit per run and form
    fit = fit_across_runs(points.done, "training", holdout=["sweep/a"])
    save_depth_fit(points.runs[f.run], f)                # the run's result test_time_fit.<form>
    save_lab_fit(lab, fit, experiment="sweep")            # LAB/fits/<experiment>.<law>.json

The points are analysis.sweep.sweep_points (one definition of N, D, T, L). Which points each
law sees:

    test-time            per run, L against T; fitted on T ≤ μ_rec, T > μ_rec held out, so
                         the held-out error is the extrapolation error in depth
    training, chinchilla across runs, the points at T = μ_rec (a run without one is skipped)
    unified              every point; T > μ_rec held out

Runs named in `holdout` are held out of training, chinchilla and unified fits as well. Only
finished runs are fitted: a diverged or interrupted run's last evaluation is not the loss
its size and data buy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from stabilitylab.analysis import scaling
from stabilitylab.analysis.sweep import sweep_points
from stabilitylab.store import Run, RunWriter, find_runs

ACROSS_RUNS = {"chinchilla": scaling.CHINCHILLA, "training": scaling.TRAINING, "unified": scaling.UNIFIED}
FITS_DIR = "fits"  # LAB/fits/<experiment>.<law>.json
DEPTH_FIT_RESULT = "test_time_fit.{form}"  # a run's result holding its test-time fit


@dataclass
class LabPoints:
    """A lab's scaling points: `done` those of finished runs, `skipped` run → status of the
    rest, `unreadable` run → why the store could not read it (the others are still fitted)."""

    runs: dict[str, Run]
    done: pd.DataFrame
    skipped: dict[str, str]
    unreadable: dict[str, str] = field(default_factory=dict)


def lab_points(lab: str | Path, experiment: str | None = None) -> LabPoints:
    """The points of the lab's runs (of `experiment`, when given); a run that cannot be read
    is left out and named in `unreadable` with the reason. Raises ValueError when no finished
    run has evaluated."""
    unreadable: dict[str, str] = {}
    runs = {r.id: r for r in find_runs(lab)}
    points = sweep_points(runs.values(), experiment=experiment, unreadable=unreadable)
    runs = {run_id: runs[run_id] for run_id in points["run"].unique()}
    done = points[points["status"] == "finished"]
    skipped = {run_id: rows["status"].iloc[0] for run_id, rows in points[points["status"] != "finished"].groupby("run")}
    if done.empty:
        raise ValueError(f"no finished run with evaluations in {lab}"
                         + (f" for experiment {experiment!r}" if experiment else ""))
    return LabPoints(runs, done, skipped, unreadable)


@dataclass
class DepthFit:
    """One run's test-time fit in one form (`fit` None and `error` set when it could not be fitted)."""

    run: str
    form: str
    step: int
    mu_rec: int
    fit: scaling.Fit | None
    error: str | None = None


def fit_depth_curves(done: pd.DataFrame, forms: Iterable[str], *, bootstrap: int = 100,
                     seed: int = 0) -> list[DepthFit]:
    """The test-time law per run and form on T ≤ μ_rec, T > μ_rec held out (module docstring)."""
    out = []
    for run_id, rows in done.groupby("run", sort=True):
        step, mu = int(rows["step"].iloc[0]), int(rows["mu_rec"].iloc[0])
        for form in forms:
            try:
                fit = scaling.fit_test_time(rows["T"], rows["L"], form, holdout=(rows["T"] > mu).to_numpy(),
                                            bootstrap=bootstrap, seed=seed)
            except ValueError as err:
                out.append(DepthFit(run_id, form, step, mu, None, str(err)))
                continue
            out.append(DepthFit(run_id, form, step, mu, fit))
    return out


def save_depth_fit(run: Run, depth_fit: DepthFit) -> str:
    """Save a run's test-time fit as its result test_time_fit.<form>; returns the result's name."""
    name = DEPTH_FIT_RESULT.format(form=depth_fit.form)
    with RunWriter.attach(run.path) as writer:
        writer.save_result(name, {**depth_fit.fit.to_dict(), "step": depth_fit.step, "mu_rec": depth_fit.mu_rec})
    return name


@dataclass
class LabFit:
    """A law fitted across runs: the points it saw (`rows`), which were held out, the fit."""

    law: str
    rows: pd.DataFrame
    held: np.ndarray
    fit: scaling.Fit
    holdout: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # runs without an evaluation at T = μ_rec

    def to_dict(self, lab: str | Path, experiment: str | None) -> dict[str, Any]:
        return {**self.fit.to_dict(), "lab": str(lab), "experiment": experiment, "holdout": sorted(self.holdout),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "points": self.rows.assign(held_out=self.held).to_dict(orient="records")}


def fit_across_runs(done: pd.DataFrame, law: str, holdout: Iterable[str] = (), *, bootstrap: int = 100,
                    seed: int = 0) -> LabFit:
    """training / chinchilla on the points at T = μ_rec; unified on every point with T > μ_rec
    held out; the `holdout` runs held out too."""
    holdout = sorted(holdout)
    if law == "unified":
        rows = done
        held = (rows["T"] > rows["mu_rec"]).to_numpy() | rows["run"].isin(holdout).to_numpy()
        fit = scaling.fit_unified(rows["N"], rows["D"], rows["T"], rows["mu_rec"], rows["L"], holdout=held,
                                  bootstrap=bootstrap, seed=seed)
        return LabFit(law, rows, held, fit, holdout)
    rows = done[done["T"] == done["mu_rec"]]
    held = rows["run"].isin(holdout).to_numpy()
    fit = scaling.fit_law(ACROSS_RUNS[law], rows["L"], N=rows["N"], D=rows["D"], holdout=held, bootstrap=bootstrap,
                          seed=seed)
    return LabFit(law, rows, held, fit, holdout, sorted(set(done["run"]) - set(rows["run"])))


def save_lab_fit(lab: str | Path, lab_fit: LabFit, experiment: str | None = None) -> Path:
    """Write LAB/fits/<experiment or all>.<law>.json: the fit, its points and what was held out."""
    path = Path(lab) / FITS_DIR / f"{experiment or 'all'}.{lab_fit.law}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(lab_fit.to_dict(lab, experiment), indent=2) + "\n")
    return path


__all__ = ["ACROSS_RUNS", "FITS_DIR", "LabPoints", "lab_points", "DepthFit", "fit_depth_curves", "save_depth_fit",
           "LabFit", "fit_across_runs", "save_lab_fit"]
