"""Scaling-law points from a sweep's runs: what `stabilitylab fit --lab` fits.

One row per (run, test-time depth T) of each run's last evaluation:

    run, experiment, status   the run's id, experiment and status (finished, diverged, ...)
    step                      the step of its last evaluation
    T, L                      test-time depth and validation loss there (evals table, val_loss)
    mu_rec                    the mean recurrence it was trained at (1 for a GPT baseline)
    N                         N(μ_rec) = N_static + μ_rec · N_core, unrolled non-embedding
                              parameters (model.flops.count_parameters on its config)
    D, C                      tokens and training FLOPs seen by that step (its cumulative scalars)

The test-time law fits L against T per run; the training law fits the rows at T = μ_rec
across runs (L = E + X·N^−x + Y·D^−y); the unified law fits every row. Runs are store
Run objects (anything with meta(), status(), evals() and scalars()); counting parameters
builds a model on the meta device, so this module needs torch (analysis.scaling does not).
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np
import pandas as pd

from stabilitylab.config import ModelConfig, from_dict
from stabilitylab.model.flops import count_parameters

METRIC = "val_loss"
COLUMNS = ("run", "experiment", "status", "step", "T", "L", "mu_rec", "N", "D", "C")


def sweep_points(runs: Iterable[Any]) -> pd.DataFrame:
    """The points of every run that has evaluated (columns COLUMNS; module docstring)."""
    counts: dict[str, Any] = {}  # count_parameters per distinct model config (an LR sweep shares one)
    frames = []
    for run in runs:
        evals = run.evals()
        evals = evals[evals["metric"] == METRIC]
        if evals.empty:
            continue
        step = int(evals["step"].max())
        last = evals[evals["step"] == step]
        meta = run.meta()
        model = meta["config"].get("model")
        if model is None:
            raise ValueError(f"{run.path}: its config has no [model] table, so N(μ_rec) is unknown; leave it out")
        key = json.dumps(model, sort_keys=True)
        if key not in counts:
            counts[key] = count_parameters(from_dict(ModelConfig, model, run.path / "config.json", "model"))
        mu = model["mean_recurrence"] if model["looped"] else 1
        seen = run.scalars(["tokens", "flops"], start=step, stop=step + 1)
        seen = dict(zip(seen["name"], seen["value"]))
        frames.append(pd.DataFrame({
            "run": run.id, "experiment": meta.get("experiment"), "status": run.status()["status"], "step": step,
            "T": last["depth"].to_numpy(), "L": last["value"].to_numpy(), "mu_rec": mu,
            "N": counts[key].unrolled(mu), "D": seen.get("tokens", np.nan), "C": seen.get("flops", np.nan)}))
    if not frames:
        return pd.DataFrame({name: [] for name in COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(COLUMNS)]


__all__ = ["sweep_points", "COLUMNS", "METRIC"]
