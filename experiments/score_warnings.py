"""Choose the forecasting warning's settings on some runs, report every warning on others.

    python experiments/score_warnings.py runs/c2_late_divergence data/reference-lab/c1_stability_grid \
        --tune-lab c2_late_divergence --tune-seeds 0 [--json out.json]

Runs of --tune-lab (default: every lab) whose seed is in --tune-seeds choose forecast_window, forecast_horizon,
forecast_state_horizon, forecast_patience and forecast_start (stabilitylab.analysis.events.WarningRules)
by a grid search: the settings with the most early warnings of the combined `forecast`
signal minus its false alarms and late warnings, ties broken by the larger median lead.
Then every signal is scored on the other runs, per lab and pooled
(analysis.events.warning_scores): recall, precision, median and 10th-percentile lead in
steps, median lead in tokens, false alarms per 1000 healthy steps. Only finished or
diverged runs count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from stabilitylab.analysis.events import History, WarningRules, analyse, run_divergence_config, warning_scores
from stabilitylab.store import find_runs

GRID = {"forecast_window": [10, 20, 40], "forecast_horizon": [25.0, 50.0, 100.0],
        "forecast_state_horizon": [50.0, 100.0, 200.0, math.inf], "forecast_patience": [1, 3, 5, 10],
        "forecast_start": [50]}  # fixed beforehand: tuned, 0 wins by firing on the init transient
COLUMNS = ["signal", "runs", "early", "late", "missed", "false_alarm", "recall", "precision", "median_lead_steps",
           "p10_lead_steps", "median_lead_tokens", "false_alarms_per_1000_healthy_steps"]


def load(labs: list[str]) -> list[tuple[str, int, History, object]]:
    """(lab, seed, history, divergence limits) of every finished or diverged run."""
    out = []
    for lab in labs:
        for run in find_runs(lab):
            if run.status()["status"] not in ("finished", "diverged"):
                continue
            out.append((Path(lab).name, run.meta().get("seed"), History.from_run(run), run_divergence_config(run.config())))
    return out


def scores(runs, rules: WarningRules) -> pd.DataFrame:
    return warning_scores(analyse(h, limits, rules) for _, _, h, limits in runs)


def choose(runs, base: WarningRules = WarningRules()) -> tuple[WarningRules, pd.Series]:
    """The grid's best settings for the `forecast` signal on `runs`."""
    best, best_key, best_row = base, None, None
    for values in itertools.product(*GRID.values()):
        rules = replace(base, **dict(zip(GRID, values)))
        table = scores(runs, rules).set_index("signal")
        if "forecast" not in table.index:
            continue
        row = table.loc["forecast"]
        lead = row["median_lead_steps"]
        key = (row["early"] - row["false_alarm"] - row["late"], -math.inf if math.isnan(lead) else lead)
        if best_key is None or key > best_key:
            best, best_key, best_row = rules, key, row
    return best, best_row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("labs", nargs="+")
    p.add_argument("--tune-lab", action="append", help="a lab (its directory name) to tune on; default: all")
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--json", help="also write the settings and tables here")
    args = p.parse_args(argv)
    runs = load(args.labs)
    tuning = [r[1] in args.tune_seeds and (not args.tune_lab or r[0] in args.tune_lab) for r in runs]
    tune = [r for r, t in zip(runs, tuning) if t]
    held = [r for r, t in zip(runs, tuning) if not t]
    rules, row = choose(tune)
    chosen = {k: getattr(rules, k) for k in GRID}
    print(f"tuned on {len(tune)} runs ({', '.join(args.tune_lab or ['every lab'])}, seeds {args.tune_seeds}): {chosen}")
    print(f"  forecast on them: early {row['early']}, late {row['late']}, false alarms {row['false_alarm']}, "
          f"median lead {row['median_lead_steps']:g}\n")
    report = {"settings": chosen, "tables": {}}
    fmt = {"float_format": lambda v: f"{v:.3g}", "index": False}
    for name in [*dict.fromkeys(lab for lab, *_ in held), "pooled"]:
        subset = held if name == "pooled" else [r for r in held if r[0] == name]
        table = scores(subset, rules)[COLUMNS]
        print(f"held out: {name} ({len(subset)} runs)\n{table.to_string(**fmt)}\n")
        report["tables"][name] = table.to_dict(orient="records")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
