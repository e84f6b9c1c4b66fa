"""Scaling-law points from a sweep's runs: what `stabilitylab fit --lab`, the report and the
dashboard's Scaling laws page fit (one definition of every column, N above all).

One row per (run, test-time depth T) of each run's last evaluation:

    run, experiment, status   the run's id, experiment and status (finished, diverged, ...)
    step                      the step of its last evaluation
    T, L                      test-time depth and validation loss there (evals table, val_loss)
    mu_rec                    the mean recurrence it was trained at (1 for a GPT baseline)
    N                         N(μ_rec) = N_static + μ_rec · N_core, unrolled non-embedding
                              parameters (config.sizes.count_parameters on its config, closed
                              form); not C / 6D, which folds the attention FLOPs and the
                              sampled depths into N
    D, C                      tokens and training FLOPs seen by that step (its cumulative scalars)

The test-time law fits L against T per run; the training law fits the rows at T = μ_rec
across runs (L = E + X·N^−x + Y·D^−y); the unified law fits every row. Runs are store
Run objects (anything with meta(), status(), evals() and scalars()). Torch-free: the
dashboard calls it.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterable

import numpy as np
import pandas as pd

from stabilitylab.config import ModelConfig, count_parameters, from_dict
from stabilitylab.records import FLOPS, TOKENS, VAL_LOSS
from stabilitylab.store import StoreError

METRIC = VAL_LOSS
COLUMNS = ("run", "experiment", "status", "step", "T", "L", "mu_rec", "N", "D", "C")


def sweep_points(runs: Iterable[Any], *, experiment: str | None = None,
                 unreadable: dict[str, str] | None = None) -> pd.DataFrame:
    """The points of every run that has evaluated (columns COLUMNS; module docstring), of
    one `experiment` if given. A run the store cannot read (StoreError: a damaged database)
    is left out and the others are read; pass a dict as `unreadable` to get its id -> why."""
    counts: dict[str, Any] = {}  # (config, count_parameters) per distinct model table (an LR sweep shares one)
    frames = []
    for run in runs:
        try:
            frame = _run_points(run, experiment, counts)
        except StoreError as err:
            if unreadable is not None:
                unreadable[run.id] = str(err)
            continue
        if frame is not None:
            frames.append(frame)
    if not frames:
        return pd.DataFrame({name: [] for name in COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(COLUMNS)]


def _run_points(run: Any, experiment: str | None, counts: dict[str, Any]) -> pd.DataFrame | None:
    """One run's rows (None: another experiment's, or never evaluated), all read from one
    commit when the run offers a snapshot (a live run keeps writing)."""
    with getattr(run, "snapshot", contextlib.nullcontext)():
        meta = run.meta()
        if experiment is not None and meta.get("experiment") != experiment:
            return None
        evals = run.evals()
        evals = evals[evals["metric"] == METRIC]
        if evals.empty:
            return None
        step = int(evals["step"].max())
        last = evals[evals["step"] == step]
        model = meta["config"].get("model")
        if model is None:
            raise ValueError(f"{run.path}: its config has no [model] table, so N(μ_rec) is unknown; leave it out")
        key = json.dumps(model, sort_keys=True)
        if key not in counts:
            cfg = from_dict(ModelConfig, model, run.path / "config.json", "model")
            counts[key] = (cfg, count_parameters(cfg))
        cfg, params = counts[key]
        mu = cfg.mean_recurrence if cfg.looped else 1
        seen = run.scalars([TOKENS, FLOPS], start=step, stop=step + 1)
        seen = dict(zip(seen["name"], seen["value"]))
        status = run.status()["status"]
    return pd.DataFrame({
        "run": run.id, "experiment": meta.get("experiment"), "status": status, "step": step,
        "T": last["depth"].to_numpy(), "L": last["value"].to_numpy(), "mu_rec": mu,
        "N": params.unrolled(mu), "D": seen.get(TOKENS, np.nan), "C": seen.get(FLOPS, np.nan)})


__all__ = ["sweep_points", "COLUMNS", "METRIC"]
