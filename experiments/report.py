"""Every number and figure of experiments/REPORT.md, regenerated from a lab.

    python experiments/report.py LAB [--out experiments] [--no-figures]

Reads the runs of the experiments c1_stability_grid ... c7_zoh through stabilitylab.store,
fits laws with stabilitylab.analysis.scaling, takes the early warning from
stabilitylab.analysis.events, and writes

    OUT/results/<claim>.json     the numbers REPORT.md cites, one file per claim
    OUT/figures/<claim>.png      one figure per claim (plotly + kaleido, Debian's chromium)
    OUT/REPORT.md                its generated blocks only (between <!-- NAME:begin --> and
                                 <!-- NAME:end -->): §C2's warning tables, from the numbers above

and prints a summary. `--only c2` redoes §C2 alone (c2.json, c2_forecast.json, its block). An experiment missing from the lab is reported as missing; a fit
that cannot be made (too few points) records its reason instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from stabilitylab import records, store
from stabilitylab.analysis import events, scaling
from stabilitylab.analysis.sweep import sweep_points
from stabilitylab.config import count_parameters, training_flops_per_token
from stabilitylab.experiment import build_experiment

sys.path.insert(0, str(Path(__file__).parent))
import figures  # noqa: E402  (experiments/figures.py, beside this file)
import score_warnings  # noqa: E402  (the warning benchmark's tuning and scores, beside this file)

WARNING_BENCHMARK = "c2_late_divergence"  # experiments/warnings/, trained by experiments/monitored.py
WARNING_TUNE_SEEDS = [0, 1]  # its runs the combined warning is tuned on; the other seeds and C1 are held out
EXPERIMENTS = {"c1": "c1_stability_grid", "c3": "c3_depth_sampling", "c4": "c4_prelude_norm",
               "c5": "c5_test_time_depth", "c6": "c6_isoflop", "c7": "c7_zoh"}


# ---- reading the lab ------------------------------------------------------------------------

def experiment_runs(table: pd.DataFrame, lab: Path, key: str) -> list[tuple[pd.Series, store.Run]]:
    """(list_runs row, Run) of one experiment's readable runs, in run-id order."""
    rows = table[(table.experiment == EXPERIMENTS[key]) & table.readable].sort_values("run_id")
    return [(row, store.open_run(row.run_id, lab)) for _, row in rows.iterrows()]


def final_evals(run: store.Run) -> dict[int, float]:
    """{depth: val_loss} at the last step that was evaluated."""
    ev = run.evals()
    ev = ev[ev.metric == records.VAL_LOSS]
    if ev.empty:
        return {}
    last = ev[ev.step == ev.step.max()]
    return {int(d): float(v) for d, v in zip(last.depth, last.value)}


def scalar(run: store.Run, name: str) -> pd.Series:
    """One scalar over steps (index: step)."""
    s = run.scalars([name])
    return pd.Series(s.value.to_numpy(), index=s.step.to_numpy(), name=name)


def spikes(run: store.Run) -> int:
    ev = run.events()
    return int((ev.kind == records.SPIKE).sum()) if not ev.empty else 0


def first_step(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    """The first step whose value exceeds threshold (NaN counts as exceeding: an overflow)."""
    above = ~(values <= threshold)
    return int(steps[above][0]) if above.any() else None


def outcome(row: pd.Series, n_spikes: int) -> str:
    """diverged (the lab's status: a bound crossed or a non-finite loss), spiking (finished,
    with loss spikes), converged (finished without), or the status of a run not done."""
    if row.status != "finished":
        return row.status
    return "spiking" if n_spikes else "converged"


def early_warnings(runs: list[store.Run]) -> tuple[dict[str, dict], list[dict]]:
    """stabilitylab.analysis.events on each run: {run id: its spikes, divergence and the
    early-warning signals that fired, with their lead before the divergence}, and the
    signal table over the runs (recall, precision, median lead)."""
    reports, skipped = events.analyse_runs(runs)
    for run_id, why in skipped.items():
        print(f"early warning: skipped {run_id}: {why}", file=sys.stderr)
    return ({rid: r.to_dict() for rid, r in reports.items()},
            events.warning_table(reports.values()).to_dict("records"))


def mu(row: pd.Series) -> int:
    return int(row["config.model.mean_recurrence"])


# ---- claims ---------------------------------------------------------------------------------

def c1_c2(table: pd.DataFrame, lab: Path) -> tuple[dict, dict, dict]:
    """C1: outcome per injection × LR × seed. C2: for each diverged run, when ρ(Ā) first
    passed 1 against the step it diverged, and the early warning's lead time."""
    runs, trajectories = [], []
    pairs = experiment_runs(table, lab, "c1")
    warned, signal_table = early_warnings([run for _, run in pairs])
    for row, run in pairs:
        spec = run.spectra()
        h = scalar(run, records.STATE_NORM)
        n_spikes = spikes(run)
        rho_step = first_step(spec.step.to_numpy(), spec.rho.to_numpy(), 1.0)
        record = {"run": row.run_id, "injection": row["config.model.injection"], "lr": float(row["config.train.lr"]),
                  "seed": int(row.seed), "outcome": outcome(row, n_spikes), "status": row.status,
                  "diverged_at": None if row.status != "diverged" else int(row.status_step),
                  "spikes": n_spikes, "final_loss": float(row.final_loss),
                  "val_loss_mu": final_evals(run).get(mu(row)),
                  "max_rho": float(row.max_rho), "final_rho": float(spec.rho.iloc[-1]) if len(spec) else None,
                  "first_rho_above_1": rho_step, "max_h_T": float(row.max_state_norm),
                  "final_h_T": float(h.iloc[-1]) if len(h) else None}
        if record["diverged_at"] is not None:
            record["rho_lead_steps"] = None if rho_step is None else record["diverged_at"] - rho_step
            if run.id in warned:
                w = warned[run.id]
                first = w["warnings"][0] if w["warnings"] else None
                record["warning"] = {"signals": w["first_signals"], "step": first and first["step"],
                                     "lead_steps": first and first["lead_steps"], "outcomes": w["outcomes"]}
        runs.append(record)
        trajectories.append({"injection": record["injection"], "lr": record["lr"], "seed": record["seed"],
                             "rho_steps": spec.step.tolist(), "rho": spec.rho.tolist(),
                             "h_steps": h.index.tolist(), "h_T": h.tolist(),
                             "loss": scalar(run, records.LOSS).tolist()})
    frame = pd.DataFrame(runs)
    cells = []
    if not frame.empty:
        for (inj, lr), g in frame.groupby(["injection", "lr"], sort=True):
            cells.append({"injection": inj, "lr": lr, "seeds": len(g),
                          **{o: int((g.outcome == o).sum()) for o in ("converged", "spiking", "diverged")},
                          "final_loss_mean": float(g.final_loss.mean()), "max_rho": float(g.max_rho.max()),
                          "max_h_T": float(g.max_h_T.max())})
    edges = {}
    for inj in sorted(frame.injection.unique()) if not frame.empty else []:
        g = frame[frame.injection == inj]
        bad = sorted(g[g.outcome == "diverged"].lr.unique())
        good = sorted(lr for lr, h in g.groupby("lr") if (h.outcome != "diverged").all())
        edges[inj] = {"lowest_lr_with_a_divergence": bad[0] if bad else None,
                      "highest_lr_all_seeds_survive": good[-1] if good else None}
    diverged = frame[frame.outcome == "diverged"] if not frame.empty else frame
    c2 = {"diverged_runs": len(diverged),
          "with_rho_above_1": int(diverged.first_rho_above_1.notna().sum()) if len(diverged) else 0,
          "rho_crossed_first": int((diverged.rho_lead_steps >= 0).sum()) if len(diverged) else 0,
          "rho_lead_steps_median": _median(diverged.rho_lead_steps) if len(diverged) else None,
          "warning_lead_steps_median": _median(r["warning"]["lead_steps"] for r in runs if r.get("warning")),
          "signals": signal_table, "runs": diverged.to_dict("records") if len(diverged) else []}
    figs = {"c1_grid": figures.outcome_grid(cells), "c2_trajectories": figures.stability_trajectories(trajectories)}
    return {"cells": cells, "edges": edges, "runs": runs}, c2, figs


def c2_forecast(lab: Path) -> dict | None:
    """The combined early warning tuned on the warning benchmark's seeds WARNING_TUNE_SEEDS and
    scored on its other seeds and on the C1 grid (experiments/score_warnings.py), strict and
    censoring-aware; None when the lab has no benchmark."""
    if not (lab / WARNING_BENCHMARK).is_dir():
        print(f"C2 warning benchmark: {lab / WARNING_BENCHMARK} missing", file=sys.stderr)
        return None
    return score_warnings.evaluate([str(lab / WARNING_BENCHMARK), str(lab / EXPERIMENTS["c1"])],
                                   [WARNING_BENCHMARK], WARNING_TUNE_SEEDS)


SIGNAL_NAMES = {"rho": "ρ(Ā) ≥ 1", "jacobian": "Jacobian radius ≥ 1 (probe)", "lyapunov": "λ₁ > 0 (probe)",
                "loop_rate": "loop contraction rate q ≥ 1 (probe)", "state_trend": "‖h_T‖ nowcast (τ ≤ 5)",
                "radius_trend": "ρ̂ trend reaches 1 within 50", "rate_trend": "q trend reaches 1 within 50",
                "rho_trend": "ρ(Ā) trend reaches 1 within 50", "loop_level": "loop rule alone",
                "forecast": "**combined warning**", "any": "any (earliest of all)"}


def _cell(value, digits: str = ".2f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, digits)


def score_rows(rows: list[dict], signals=None) -> list[str]:
    """Markdown rows of a warning_scores table (signals: which, in that order; None: all)."""
    by = {r["signal"]: r for r in rows}
    out = []
    for name in signals or by:
        if name not in by:
            continue
        r = by[name]
        out.append(f"| {SIGNAL_NAMES.get(name, name)} | {r['early']} | {r['late']} | {r['missed']} | "
                   f"{r['false_alarm']} | {r['censored']} | {_cell(r['recall'])} | {_cell(r['precision'])} | "
                   f"{_cell(r['median_lead_steps'], 'g')} | {_cell(r['p10_lead_steps'], '.3g')} | "
                   f"{_cell(r['median_lead_tokens'], ',.0f')} | {_cell(r['false_alarms_per_1000_healthy_steps'])} |")
    return out


SCORE_HEADER = ["| signal | early | late | missed | false alarms | censored | recall | precision | median lead "
                "(steps) | 10th pct lead | median lead (tokens) | false alarms / 1000 healthy steps |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def c2_markdown(c2: dict) -> str:
    """§C2's generated block: the warning benchmark's held-out scores and C1's, strict and
    censoring-aware, and the per-run warnings of the benchmark's held-out late divergences."""
    f = c2.get("forecast")
    if not f:
        return "_The warning benchmark is not in this lab: `experiments/monitored.py` trains it._"
    s = f["settings"]
    lines = [f"Combined warning (`forecast`), settings tuned on {WARNING_BENCHMARK} seeds "
             f"{', '.join(map(str, f['tuned_on']['seeds']))} ({f['tuned_on']['runs']} runs): loop radius median over "
             f"{s['loop_window']} steps > {s['loop_level']:g} on {s['loop_patience']} step(s) in a row, or the ‖h_T‖ "
             f"nowcast on {s['nowcast_patience']} steps in a row. Held out: the benchmark's other seeds and the C1 "
             f"grid. Strict: every warning in a run that did not diverge is a false alarm; censoring-aware: one "
             f"within {f['censor_steps']:g} steps of the run's end is counted as censored instead.", ""]
    for lab, title in ((WARNING_BENCHMARK, "late-divergence benchmark, held-out seeds"),
                       (EXPERIMENTS["c1"], "C1 grid (never tuned on)")):
        for kind in ("strict", "censored"):
            rows = f[kind].get(lab)
            if rows:
                lines += [f"**{title}, {kind}** ({rows[0]['runs']} runs)", "", *SCORE_HEADER, *score_rows(rows), ""]
    late = [r for r in f["runs"]["held_out"] if r["lab"] == WARNING_BENCHMARK and r["diverged_at"] is not None]
    if late:
        lines += ["Held-out divergences of the benchmark: divergence step → lead of the combined warning "
                  "(— : none before it)", "", "| run | diverged at | warned at | lead |", "|---|---|---|---|"]
        for r in sorted(late, key=lambda r: r["run"]):
            lines.append(f"| {r['run']} | {r['diverged_at']} | {_cell(r['forecast_step'], 'd')} | "
                         f"{_cell(r['lead_steps'], 'd')} |")
        ahead = [r["lead_steps"] for r in late if r["diverged_at"] >= 100 and r["outcome"] == "early"]
        n100 = sum(r["diverged_at"] >= 100 for r in late)
        lines += ["", f"{n100} of {len(late)} held-out divergences are ≥ 100 steps in; the combined warning "
                      f"fired before {len(ahead)} of them, median lead "
                      f"{_cell(float(np.median(ahead)) if ahead else None, 'g')} steps, 10th percentile "
                      f"{_cell(float(np.percentile(ahead, 10)) if ahead else None, '.3g')}."]
    return "\n".join(lines)


def write_block(path: Path, name: str, text: str) -> bool:
    """Replace what lies between <!-- name:begin --> and <!-- name:end --> in `path`; False if
    the file or the markers are missing (nothing written)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if not path.is_file():
        return False
    doc = path.read_text()
    if begin not in doc or end not in doc:
        return False
    head, rest = doc.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
    return True


def c3(table: pd.DataFrame, lab: Path) -> tuple[dict, dict]:
    """Spikes and validation loss at test depths, per-batch vs per-sequence depth sampling,
    at each learning rate."""
    runs = []
    for row, run in experiment_runs(table, lab, "c3"):
        runs.append({"run": row.run_id, "granularity": row["config.model.depth_granularity"],
                     "lr": float(row["config.train.lr"]), "seed": int(row.seed), "status": row.status,
                     "spikes": spikes(run), "val_loss": final_evals(run), "loss": scalar(run, records.LOSS).tolist()})
    groups = {}
    for gran, lr in sorted({(r["granularity"], r["lr"]) for r in runs}, key=lambda g: (g[1], g[0])):
        rs = [r for r in runs if (r["granularity"], r["lr"]) == (gran, lr)]
        depths = sorted(set.intersection(*(set(r["val_loss"]) for r in rs)))
        val = {d: float(np.mean([r["val_loss"][d] for r in rs])) for d in depths}
        groups[f"{gran}, lr {lr:g}"] = {
            "granularity": gran, "lr": lr, "runs": len(rs), "spikes_total": sum(r["spikes"] for r in rs),
            "spikes_per_run": [r["spikes"] for r in rs], "val_loss_mean": val,
            "val_ppl_mean": {d: math.exp(v) for d, v in val.items()},
            "val_loss_std": {d: float(np.std([r["val_loss"][d] for r in rs])) for d in depths}}
    return ({"groups": groups, "runs": [{k: v for k, v in r.items() if k != "loss"} for r in runs]},
            {"c3_depth_sampling": figures.depth_sampling(runs, groups)})


def c4(table: pd.DataFrame, lab: Path) -> tuple[dict, dict]:
    """‖e‖ and ‖h_T‖ over training with and without the prelude norm."""
    runs = []
    for row, run in experiment_runs(table, lab, "c4"):
        spec, h = run.spectra(), scalar(run, records.STATE_NORM)
        half = h.index.max() / 2 if len(h) else 0
        runs.append({"run": row.run_id, "prelude_norm": bool(row["config.model.prelude_norm"]),
                     "lr": float(row["config.train.lr"]), "seed": int(row.seed), "status": row.status,
                     "diverged_at": None if row.status != "diverged" else int(row.status_step),
                     "e_first": float(spec.norm_e.iloc[0]) if len(spec) else None,
                     "e_final": float(spec.norm_e.iloc[-1]) if len(spec) else None,
                     "e_max": float(spec.norm_e.max()) if len(spec) else None,
                     "h_T_max_first_half": float(h[h.index <= half].max()) if len(h) else None,
                     "h_T_max_second_half": float(h[h.index > half].max()) if len(h) else None,
                     "h_T_final": float(h.iloc[-1]) if len(h) else None, "max_rho": float(row.max_rho),
                     "val_loss_mu": final_evals(run).get(mu(row)), "final_loss": float(row.final_loss),
                     "e_steps": spec.step.tolist(), "e": spec.norm_e.tolist(),
                     "h_steps": h.index.tolist(), "h_T": h.tolist()})
    return ({"runs": [{k: v for k, v in r.items() if k not in ("e_steps", "e", "h_steps", "h_T")} for r in runs]},
            {"c4_prelude_norm": figures.prelude_norm(runs)})


def c5(table: pd.DataFrame, lab: Path) -> tuple[dict, dict]:
    """The four test-time forms fitted on T ≤ μ_rec, scored in sample and on μ_rec < T ≤ 3μ_rec;
    L∞ of the exp form (fitted on T ≤ 3μ_rec) against L(T = μ_rec)."""
    runs = []
    for row, run in experiment_runs(table, lab, "c5"):
        m, ev = mu(row), final_evals(run)
        T = np.array([d for d in sorted(ev) if d <= 3 * m])
        L = np.array([ev[d] for d in T])
        record = {"run": row.run_id, "mu_rec": m, "seed": int(row.seed), "status": row.status,
                  "T": T.tolist(), "L": L.tolist(), "forms": {}}
        try:
            for form, fit in scaling.fit_test_time_forms(T, L, mu_rec=m, bootstrap=0).items():
                record["forms"][form] = {"params": fit.params, "in_sample_error": fit.in_sample_error,
                                         "extrapolation_error": fit.held_out_error}
            full = scaling.fit_test_time(T, L, "exp", bootstrap=0)
            record["exp_all"] = {"params": full.params, "in_sample_error": full.in_sample_error}
            record["L_inf_vs_L_mu"] = full.params["L_inf"] / ev[m] - 1
        except (ValueError, KeyError) as err:
            record["error"] = str(err)
        runs.append(record)
    forms = {}
    for form in scaling.TEST_TIME_FORMS:
        fitted = [r["forms"][form] for r in runs if form in r["forms"]]
        if fitted:
            forms[form] = {"in_sample_error_mean": float(np.mean([f["in_sample_error"] for f in fitted])),
                           "extrapolation_error_mean": _mean(f["extrapolation_error"] for f in fitted),
                           "best_extrapolation_in": sum(_best(r, form) for r in runs)}
    gaps = [r["L_inf_vs_L_mu"] for r in runs if "L_inf_vs_L_mu" in r]
    return ({"forms": forms, "L_inf_vs_L_mu": {"mean_abs": _mean(abs(g) for g in gaps),
                                               "max_abs": max(map(abs, gaps)) if gaps else None}, "runs": runs},
            {"c5_test_time": figures.test_time(runs)})


def c6(table: pd.DataFrame, lab: Path) -> tuple[dict, dict]:
    """The training law at T = μ_rec, the compute-optimal allocation it implies, the
    observed isoFLOP optima, and the unified law held out on the largest budget."""
    pairs = experiment_runs(table, lab, "c6")
    rows = {row.run_id: row for row, _ in pairs}
    pts = sweep_points(run for _, run in pairs)  # the points `stabilitylab fit --lab` and the dashboard fit
    pts["budget"] = [float(rows[r]["config.train.flop_budget"]) for r in pts["run"]]
    runs = []
    for run_id, g in pts.groupby("run", sort=True):
        at_mu = g[g["T"] == g["mu_rec"]]
        runs.append({"run": run_id, "mu_rec": int(g.mu_rec.iloc[0]), "budget": float(g.budget.iloc[0]),
                     "steps": int(rows[run_id].last_step), "N": float(g.N.iloc[0]), "D": float(g.D.iloc[0]),
                     "C": float(g.C.iloc[0]), "L_mu": float(at_mu.L.iloc[0]) if len(at_mu) else None,
                     "status": rows[run_id].status})
    points = pts[["run", "budget", "N", "D", "T", "mu_rec", "L"]].to_dict(orient="records")
    result: dict = {"runs": runs}
    frame = pd.DataFrame(runs)
    if frame.empty:
        return result, {}
    exp = build_experiment(pairs[-1][1].meta()["config"])  # the sweep shares its model but for μ_rec
    cfg, seq_len = exp.model, exp.data.seq_len
    ok = frame.dropna(subset=["L_mu"])
    result["isoflop_optimum"] = {str(b): {"mu_rec": int(g.loc[g.L_mu.idxmin(), "mu_rec"]), "L": float(g.L_mu.min())}
                                 for b, g in ok.groupby("budget")}
    try:
        fit = scaling.fit_training(ok.N, ok.D, ok.L_mu, bootstrap=100)
        result["training_law"] = {"params": fit.params, "intervals": fit.intervals,
                                  "in_sample_error": fit.in_sample_error, "points": fit.n_points}
        params = count_parameters(cfg)

        def flops(m: float) -> float:  # the lab's count with μ_bwd = μ/2 (continuous μ)
            return training_flops_per_token(cfg, seq_len, n=m / 2, k=m / 2, params=params).total

        budgets = np.geomspace(ok.C.min(), ok.C.max(), 8)
        for name, per_token in (("lab_flops", flops), ("6N", None)):
            alloc = scaling.optimal_allocation(fit, budgets, params, flops_per_token=per_token)
            result[f"allocation_{name}"] = {"C": alloc.C.tolist(), "mu_rec": alloc.mu_rec.tolist(),
                                            "D": alloc.D.tolist(), "gamma_mu": alloc.gamma_mu,
                                            "gamma_D": alloc.gamma_D}
    except ValueError as err:
        result["training_law"] = {"error": str(err)}
    result["unified_law"] = _unified(pts[["run", "budget", "N", "D", "T", "mu_rec", "L"]])
    return result, {"c6_isoflop": figures.isoflop(runs, points, result)}


def _unified(pts: pd.DataFrame) -> dict:
    """The unified law fitted on every (run, T) point below the largest budget, scored on the
    largest budget's runs; and leave-one-run-out: each run's points predicted by a fit to
    the other runs."""
    if pts.empty:
        return {"error": "no evaluations"}
    out: dict = {}
    held = (pts.budget == pts.budget.max()).to_numpy()
    try:
        fit = scaling.fit_unified(pts.N, pts.D, pts["T"], pts.mu_rec, pts.L, holdout=held, bootstrap=0)
        out["largest_budget_held_out"] = {"params": fit.params, "in_sample_error": fit.in_sample_error,
                                          "held_out_error": fit.held_out_error, "points": fit.n_points,
                                          "held_out_points": int(held.sum())}
        errors = {}
        for run in sorted(pts.run.unique()):
            mask = (pts.run == run).to_numpy()
            errors[run] = scaling.fit_unified(pts.N, pts.D, pts["T"], pts.mu_rec, pts.L, holdout=mask,
                                              bootstrap=0).held_out_error
        out["leave_one_run_out"] = {"mean_error": float(np.mean(list(errors.values()))),
                                    "max_error": float(max(errors.values())), "per_run": errors}
    except ValueError as err:
        out["error"] = str(err)
    return out


def c7(table: pd.DataFrame, lab: Path, c1_runs: list[dict]) -> tuple[dict, dict]:
    """Euler vs exact-ZOH B̄ on matched seeds: validation loss at T = μ_rec, paired by seed
    (c7), and the c1 grid's pairs where both survived."""
    val = {}
    for row, run in experiment_runs(table, lab, "c7"):
        val[(row["config.model.injection"], int(row.seed))] = final_evals(run).get(mu(row))
    pairs = [{"seed": s, "parcae": val[("parcae", s)], "parcae_zoh": val[("parcae-zoh", s)],
              "zoh_minus_euler": val[("parcae-zoh", s)] - val[("parcae", s)]}
             for s in sorted({s for _, s in val}) if ("parcae", s) in val and ("parcae-zoh", s) in val
             and None not in (val[("parcae", s)], val[("parcae-zoh", s)])]
    grid = {(r["injection"], r["lr"], r["seed"]): r for r in c1_runs}
    grid_pairs = [{"lr": lr, "seed": s, "zoh_minus_euler": z["val_loss_mu"] - e["val_loss_mu"]}
                  for (inj, lr, s), e in sorted(grid.items()) if inj == "parcae"
                  and (z := grid.get(("parcae-zoh", lr, s))) and e["outcome"] != "diverged"
                  and z["outcome"] != "diverged" and None not in (e["val_loss_mu"], z["val_loss_mu"])]
    diffs = [p["zoh_minus_euler"] for p in pairs]
    result = {"pairs": pairs, "mean_zoh_minus_euler": _mean(diffs), "zoh_lower_in": sum(d < 0 for d in diffs),
              "grid_pairs": grid_pairs, "grid_zoh_lower_in": sum(p["zoh_minus_euler"] < 0 for p in grid_pairs),
              "grid_mean_zoh_minus_euler": _mean(p["zoh_minus_euler"] for p in grid_pairs)}
    return result, {"c7_zoh": figures.zoh(pairs, grid_pairs)}


def dynamics(table: pd.DataFrame, lab: Path) -> tuple[dict, dict]:
    """Does ρ(Ā) < 1 make the nonlinear loop contract? For every analysis probe in the lab:
    ρ(Ā) at that step, ρ(∂F/∂h) at h_T and the leading Lyapunov exponent λ₁."""
    probes = []
    for key in EXPERIMENTS:
        for row, run in experiment_runs(table, lab, key):
            analysis = run.analysis()
            if analysis.empty:
                continue
            spec = run.spectra().set_index("step").rho
            for step, g in analysis.groupby("step"):
                values = dict(zip(g.name, g["values"]))
                if records.JACOBIAN_RADIUS not in values or step not in spec.index:
                    continue
                probes.append({"run": row.run_id, "experiment": row.experiment,
                               "injection": row["config.model.injection"], "step": int(step),
                               "rho_A": float(spec.loc[step]), "rho_J": float(values[records.JACOBIAN_RADIUS][0]),
                               "lambda_1": float(values[records.LYAPUNOV][0])})
    frame = pd.DataFrame(probes)
    summary = {}
    if not frame.empty:
        contracting_A = frame[frame.rho_A < 1]
        summary = {"probes": len(frame), "rho_A_below_1": len(contracting_A),
                   "of_which_rho_J_at_least_1": int((contracting_A.rho_J >= 1).sum()),
                   "of_which_lambda_1_positive": int((contracting_A.lambda_1 > 0).sum()),
                   "rho_A_at_least_1": int((frame.rho_A >= 1).sum()),
                   "by_injection": {inj: {"probes": len(g), "rho_A_max": float(g.rho_A.max()),
                                          "rho_J_max": float(g.rho_J.max()), "lambda_1_max": float(g.lambda_1.max()),
                                          "rho_J_minus_rho_A_max": float((g.rho_J - g.rho_A).max())}
                                    for inj, g in frame.groupby("injection")}}
    return {"summary": summary, "probes": probes}, {"dynamics": figures.dynamics(probes)}


def runtimes(table: pd.DataFrame, lab: Path) -> dict:
    """Per experiment: runs, the wall-clock span from the first run's start to the last run's
    end (the sweep's runtime, parallel jobs and queueing included) and the summed training
    time of its runs (the trainer's wall_time)."""
    out = {}
    for key, name in EXPERIMENTS.items():
        pairs = experiment_runs(table, lab, key)
        if not pairs:
            continue
        starts = [pd.Timestamp(row.started_at).timestamp() for row, _ in pairs]
        ends = [run.status()["time"] for _, run in pairs]
        trained = [float(scalar(run, records.WALL_TIME).iloc[-1]) for _, run in pairs]
        out[name] = {"runs": len(pairs), "span_minutes": (max(ends) - min(starts)) / 60,
                     "training_minutes_summed": sum(trained) / 60}
    return out


def _median(values) -> float | None:
    values = [v for v in values if v is not None and not pd.isna(v)]
    return float(np.median(values)) if values else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not pd.isna(v)]
    return float(np.mean(values)) if values else None


def _best(run: dict, form: str) -> int:
    """1 if `form` has the smallest extrapolation error of the run's fitted forms."""
    errors = {f: v["extrapolation_error"] for f, v in run["forms"].items() if v["extrapolation_error"] is not None}
    return int(bool(errors) and min(errors, key=errors.get) == form)


# ---- output ---------------------------------------------------------------------------------

def summary(results: dict) -> str:
    """The headline numbers, one claim per paragraph."""
    r, lines = results, []
    lines.append("C1  outcome per injection × lr (diverged/spiking/converged of seeds):")
    for c in r["c1"]["cells"]:
        lines.append(f"    {c['injection']:<14} lr {c['lr']:<7g} {c['diverged']}/{c['spiking']}/{c['converged']}  "
                     f"max ρ(Ā) {c['max_rho']:.3g}  max ‖h_T‖ {c['max_h_T']:.3g}  loss {c['final_loss_mean']:.3f}")
    for inj, e in r["c1"]["edges"].items():
        lines.append(f"    {inj}: highest lr all seeds survive {e['highest_lr_all_seeds_survive']}, "
                     f"lowest lr with a divergence {e['lowest_lr_with_a_divergence']}")
    c2 = r["c2"]
    lines.append(f"C2  {c2['diverged_runs']} diverged runs; ρ(Ā) > 1 in {c2['with_rho_above_1']}, before or at the "
                 f"divergence in {c2['rho_crossed_first']}; median lead of ρ > 1: {c2['rho_lead_steps_median']} steps; "
                 f"median lead of the early warning: {c2['warning_lead_steps_median']} steps")
    for row in c2["signals"]:
        lines.append(f"C2  signal {row['signal']:<11} runs {row['runs']}: early {row['early']}, late {row['late']}, "
                     f"missed {row['missed']}, false alarms {row['false_alarm']}, recall {row['recall']:.2f}, "
                     f"precision {row['precision']:.2f}, median lead {row['median_lead_steps']} steps")
    for lab, rows in ((r.get("c2_forecast") or {}).get("strict") or {}).items():
        f = next((row for row in rows if row["signal"] == "forecast"), None)
        if f and lab != "pooled":
            lines.append(f"C2  combined warning, held out on {lab}: recall {f['recall']:.2f}, precision "
                         f"{f['precision']:.2f}, median lead {f['median_lead_steps']} steps, false alarms / 1000 "
                         f"healthy steps {f['false_alarms_per_1000_healthy_steps']:.2f}")
    for name, g in r["c3"]["groups"].items():
        val = ", ".join(f"T={d}: {v:.3f} (ppl {math.exp(v):.2f})" for d, v in g["val_loss_mean"].items())
        lines.append(f"C3  per {name}: spikes {g['spikes_per_run']}; val loss {val}")
    for run in r["c4"]["runs"]:
        lines.append(f"C4  norm {'on ' if run['prelude_norm'] else 'off'} lr {run['lr']:g} s{run['seed']}: "
                     f"‖e‖ {run['e_first']:.3g} → {run['e_final']:.3g}, max ‖h_T‖ 1st/2nd half "
                     f"{run['h_T_max_first_half']:.3g}/{run['h_T_max_second_half']:.3g}, val {run['val_loss_mu']}, "
                     f"{run['status']}")
    for form, f in r["c5"]["forms"].items():
        lines.append(f"C5  {form:<10} in-sample {100 * f['in_sample_error_mean']:.3f}%  extrapolation "
                     f"{_pct(f['extrapolation_error_mean'])}  best extrapolation in {f['best_extrapolation_in']} runs")
    lines.append(f"C5  |L∞/L(μ_rec) − 1|: mean {_pct(r['c5']['L_inf_vs_L_mu']['mean_abs'])}, "
                 f"max {_pct(r['c5']['L_inf_vs_L_mu']['max_abs'])}")
    c6 = r["c6"]
    if "training_law" in c6:
        law = c6["training_law"]
        lines.append(f"C6  training law: {law.get('params', law.get('error'))}, in-sample {_pct(law.get('in_sample_error'))}")
        for name in ("lab_flops", "6N"):
            if f"allocation_{name}" in c6:
                a = c6[f"allocation_{name}"]
                lines.append(f"C6  allocation ({name}): μ* ∝ C^{a['gamma_mu']:.3f}, D* ∝ C^{a['gamma_D']:.3f}")
        lines.append(f"C6  observed isoFLOP optima: {c6.get('isoflop_optimum')}")
        u = c6["unified_law"]
        if "largest_budget_held_out" in u:
            h = u["largest_budget_held_out"]
            lines.append(f"C6  unified law: in-sample {_pct(h['in_sample_error'])}, held out (largest C) "
                         f"{_pct(h['held_out_error'])}, leave-one-run-out mean {_pct(u['leave_one_run_out']['mean_error'])}")
    c7 = r["c7"]
    lines.append(f"C7  zoh − euler (c7, per seed): {[round(p['zoh_minus_euler'], 4) for p in c7['pairs']]}, "
                 f"mean {c7['mean_zoh_minus_euler']}; c1 grid pairs: zoh lower in {c7['grid_zoh_lower_in']} of "
                 f"{len(c7['grid_pairs'])}")
    for name, t in r["runtimes"].items():
        lines.append(f"Time {name}: {t['runs']} runs, {t['span_minutes']:.1f} min wall, "
                     f"{t['training_minutes_summed']:.1f} min of training summed")
    d = r["dynamics"]["summary"]
    if d:
        lines.append(f"Dyn {d['probes']} analysis probes; ρ(Ā) < 1 in {d['rho_A_below_1']}, of which ρ(∂F/∂h) ≥ 1 in "
                     f"{d['of_which_rho_J_at_least_1']} and λ₁ > 0 in {d['of_which_lambda_1_positive']}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.3f}%"


def _plain(value):
    """JSON-safe: numpy numbers to Python, NaN and inf to None, dict keys to strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab", help="the lab holding the experiments' runs")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="writes OUT/results and OUT/figures")
    parser.add_argument("--no-figures", action="store_true", help="numbers only")
    parser.add_argument("--only", choices=["c2"], help="redo one claim: its results, figure and REPORT.md block")
    args = parser.parse_args(argv)
    lab, out = Path(args.lab), Path(args.out)
    table = store.list_runs(lab, check=True)  # a damaged run is reported here and left out of every claim
    if table.empty:
        print(f"{lab}: no runs", file=sys.stderr)
        return 2
    for row in table[~table.readable.astype(bool)].itertuples():
        print(f"skipped {row.run_id}: {row.error}", file=sys.stderr)
    c1, c2, figs = c1_c2(table, lab)
    c2["forecast"] = c2_forecast(lab)
    if args.only == "c2":
        return write_c2(out, c2, None if args.no_figures else {"c2_trajectories": figs["c2_trajectories"]})
    results = {"c1": c1, "c2": c2}
    for claim, compute in (("c3", c3), ("c4", c4), ("c5", c5), ("c6", c6), ("dynamics", dynamics)):
        results[claim], more = compute(table, lab)
        figs |= more
    results["c7"], more = c7(table, lab, c1["runs"])
    figs |= more
    results["runtimes"] = runtimes(table, lab)
    (out / "results").mkdir(parents=True, exist_ok=True)
    results["c2_forecast"] = results["c2"].pop("forecast")
    for claim, value in results.items():
        if value is None:
            continue
        path = out / "results" / f"{claim}.json"
        path.write_text(json.dumps(_plain(value), indent=1, allow_nan=False) + "\n")
    print(summary(results))
    c2["forecast"] = results["c2_forecast"]
    print(f"REPORT.md §C2 block {'written' if write_block(out / 'REPORT.md', 'c2', c2_markdown(c2)) else 'not found'}")
    if not args.no_figures:
        print(figures.write(figs, out / "figures"))
    return 0


def write_c2(out: Path, c2: dict, figs: dict | None) -> int:
    """--only c2: results/c2.json (without the benchmark), results/c2_forecast.json, the figure
    unless None, and REPORT.md's c2 block."""
    (out / "results").mkdir(parents=True, exist_ok=True)
    forecast = c2.pop("forecast")
    (out / "results" / "c2.json").write_text(json.dumps(_plain(c2), indent=1, allow_nan=False) + "\n")
    if forecast is not None:
        (out / "results" / "c2_forecast.json").write_text(json.dumps(_plain(forecast), indent=1, allow_nan=False) + "\n")
    c2["forecast"] = forecast
    print(f"REPORT.md §C2 block {'written' if write_block(out / 'REPORT.md', 'c2', c2_markdown(c2)) else 'not found'}")
    if figs:
        print(figures.write(figs, out / "figures"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
