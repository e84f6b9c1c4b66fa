"""Choose the combined warning's settings on some runs, report every warning on others.

    python experiments/score_warnings.py data/reference-lab/c2_late_divergence data/reference-lab/c1_stability_grid \\
        --tune-lab c2_late_divergence --tune-seeds 0 1 [--censor 50] [--json out.json]

Runs of --tune-lab (default: every lab) whose seed is in --tune-seeds choose loop_window,
loop_patience and nowcast_patience (stabilitylab.analysis.events.WarningRules; loop_level
stays 1, the stability boundary) by a grid search aimed at the issue's goals: of the settings
whose combined `forecast` reaches recall ≥ 0.9 and precision ≥ 0.8 on the tuning runs, the
one with the longest median lead (then the fewest false alarms); if none does, the most
early warnings minus false alarms and late ones. Then every signal is scored on the other
runs, per lab and pooled (analysis.events.warning_scores): recall, precision, median and
10th-percentile lead in steps, median lead in tokens, false alarms per 1000 healthy steps,
twice: strict (every warning in a run that did not diverge is a false alarm) and
censoring-aware (one raised within --censor steps of the run's end is "censored", left
out: the run ended before it could be proven wrong). Only finished or diverged runs count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

from stabilitylab.analysis.events import History, WarningRules, analyse, run_divergence_config, warning_scores
from stabilitylab.store import find_runs
from stabilitylab.records import RADIUS_ESTIMATE

GRID = {"loop_window": [5, 10, 20, 40], "loop_patience": [1, 5, 10, 20],
        "nowcast_patience": [1, 2]}  # ≤ 2: a patience p spends p − 1 of the nowcast's 5-step horizon
GOALS = {"recall": 0.9, "precision": 0.8}  # the issue's; the lead is what the choice maximises
CENSOR = WarningRules().forecast_horizon  # steps: the farthest any signal here claims to see
COLUMNS = ["signal", "runs", "early", "late", "missed", "false_alarm", "censored", "recall", "precision",
           "median_lead_steps", "p10_lead_steps", "median_lead_tokens", "false_alarms_per_1000_healthy_steps"]


def load(labs: list[str], radius_every: int = 1) -> list[tuple[str, int, History, object, str]]:
    """(lab, seed, history, divergence limits, run id) of every finished or diverged run.
    radius_every k > 1 keeps the radius estimate of every k-th step only: the warning as
    a monitor recording ρ̂ every k steps (LoopMonitor's default, RADIUS_EVERY) would see it."""
    out = []
    for lab in labs:
        for run in find_runs(lab):
            if run.status()["status"] not in ("finished", "diverged"):
                continue
            history = History.from_run(run)
            radius = history.scalars.get(RADIUS_ESTIMATE)
            if radius_every > 1 and radius is not None:
                history = replace(history, scalars={**history.scalars,
                                                    RADIUS_ESTIMATE: radius[radius.index % radius_every == 0]})
            out.append((Path(lab).name, run.meta().get("seed"), history, run_divergence_config(run.config()), run.id))
    return out


def split(runs, tune_labs: list[str] | None, tune_seeds: list[int]) -> tuple[list, list]:
    """(tuning runs, held-out runs): tuning = a seed in tune_seeds, of a lab in tune_labs (None: any)."""
    tuning = [r[1] in tune_seeds and (not tune_labs or r[0] in tune_labs) for r in runs]
    return [r for r, t in zip(runs, tuning) if t], [r for r, t in zip(runs, tuning) if not t]


def scores(runs, rules: WarningRules, censor: float | None = None) -> pd.DataFrame:
    return warning_scores((analyse(h, limits, rules) for _, _, h, limits, _ in runs), censor)


def choose(runs, base: WarningRules = WarningRules()) -> tuple[WarningRules, pd.Series]:
    """The grid's best settings for the combined `forecast` on `runs` (module docstring)."""
    best, best_key, best_row = base, None, None
    for values in itertools.product(*GRID.values()):
        rules = replace(base, **dict(zip(GRID, values)))
        table = scores(runs, rules).set_index("signal")
        if "forecast" not in table.index:
            continue
        row = table.loc["forecast"]
        lead = -math.inf if math.isnan(row["median_lead_steps"]) else row["median_lead_steps"]
        meets = all(row[k] >= v for k, v in GOALS.items())
        key = (meets, lead if meets else row["early"] - row["false_alarm"] - row["late"],
               -row["false_alarm"] if meets else lead)
        if best_key is None or key > best_key:
            best, best_key, best_row = rules, key, row
    return best, best_row


def run_table(runs, rules: WarningRules) -> list[dict]:
    """Per run: its id, lab, divergence step and the combined warning's step and lead."""
    out = []
    for lab, _, history, limits, run_id in runs:
        report = analyse(history, limits, rules)
        w = next((w for w in report.warnings if w.signal == "forecast"), None)
        out.append({"run": run_id, "lab": lab, "diverged_at": report.divergence and report.divergence.step,
                    "last_step": report.last_step, "forecast_step": w and w.step,
                    "lead_steps": w and w.lead_steps, "outcome": report.outcomes().get("forecast")})
    return out


def evaluate(labs: list[str], tune_labs: list[str] | None, tune_seeds: list[int], censor: float = CENSOR,
             radius_every: int = 1) -> dict:
    """Tune on the tuning runs, score on the held-out ones: settings, tuning-run row, and
    {"strict" | "censored": {lab | "pooled": table rows}} on the held-out runs."""
    runs = load(labs, radius_every)
    tune, held = split(runs, tune_labs, tune_seeds)
    rules, row = choose(tune)
    report = {"settings": {k: getattr(rules, k) for k in ("loop_level", *GRID)}, "censor_steps": censor,
              "tuned_on": {"labs": tune_labs or "all", "seeds": tune_seeds, "runs": len(tune)},
              "tuning_row": {k: row[k] for k in COLUMNS if k in row.index}, "strict": {}, "censored": {},
              "held_out_runs": len(held)}
    for name in [*dict.fromkeys(lab for lab, *_ in held), "pooled"]:
        subset = held if name == "pooled" else [r for r in held if r[0] == name]
        report["strict"][name] = scores(subset, rules)[COLUMNS].to_dict(orient="records")
        report["censored"][name] = scores(subset, rules, censor)[COLUMNS].to_dict(orient="records")
    report["runs"] = {"held_out": run_table(held, rules), "tuning": run_table(tune, rules)}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("labs", nargs="+")
    p.add_argument("--tune-lab", action="append", help="a lab (its directory name) to tune on; default: all")
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--censor", type=float, default=CENSOR, help="steps before a run's end (default %(default)g)")
    p.add_argument("--radius-every", type=int, default=1,
                   help="score with the radius estimate of every k-th step only (default %(default)s: as recorded)")
    p.add_argument("--json", help="also write the settings and tables here")
    args = p.parse_args(argv)
    if args.radius_every < 1:
        p.error(f"--radius-every must be ≥ 1, got {args.radius_every}")
    report = evaluate(args.labs, args.tune_lab, args.tune_seeds, args.censor, args.radius_every)
    row = report["tuning_row"]
    print(f"tuned on {report['tuned_on']['runs']} runs ({', '.join(args.tune_lab or ['every lab'])}, seeds "
          f"{args.tune_seeds}): {report['settings']}")
    print(f"  forecast on them: early {row['early']}, late {row['late']}, false alarms {row['false_alarm']}, "
          f"median lead {row['median_lead_steps']:g}\n")
    fmt = {"float_format": lambda v: f"{v:.3g}", "index": False}
    for kind in ("strict", "censored"):
        for name, rows in report[kind].items():
            print(f"held out, {kind}: {name}\n{pd.DataFrame(rows).to_string(**fmt)}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
