"""The verbs that analyse models and runs: fit, analyze, check, events. Each parses, calls
the analysis room (stabilitylab.analysis, analyze, targets) and prints what it returns."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stabilitylab.cli.common import UsageError, add_lab, check_counts
from stabilitylab.config import ConfigError

TARGET_HELP = ("a run directory or run id in --lab, a checkpoint file, or a checkpoint directory (parcae_lm, "
               "hrm_text, huginn, ouro)")
FORMAT_HELP = "force the format of a checkpoint directory (parcae_lm, hrm_text, huginn, ouro); default: from its config.json"
PREFIX_HELP = ("hrm_text: positions 0..N-1 of every sequence are the instruction of the prefix-LM mask "
               "(bidirectional among them); default 0, causal")
LAWS = ("chinchilla", "training", "test-time", "unified")


# ---- fit ---------------------------------------------------------------------------------------

def add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a scaling law to a CSV of losses, or to a sweep's runs (--lab)")
    p.add_argument("csv", nargs="?", help="CSV file, one row per point (or --lab instead)")
    p.add_argument("--law", required=True, choices=LAWS)
    p.add_argument("--form", default="exp", help="test-time form: exp, power1p, power or pure-power (with --lab "
                                                 "also all)")
    p.add_argument("--columns", default="",
                   help="NAME=column pairs, comma separated, for the names N, D, T, mu_rec, L (default: the "
                        "column of the same name); C=column gives D = C / (6 N) when there is no D")
    p.add_argument("--lab", help="fit the runs of this lab (their last evaluation) instead of a CSV")
    p.add_argument("--experiment", help="with --lab: only the runs of this experiment")
    p.add_argument("--holdout", action="append", default=[], metavar="RUN",
                   help="with --lab: a run left out of a training or unified fit; its points give the "
                        "held-out error (repeatable)")
    p.add_argument("--write", action="store_true",
                   help="with --lab: save the fits (test-time in each run's results, training / unified / "
                        "chinchilla as LAB/fits/<experiment>.<law>.json)")
    p.add_argument("--bootstrap", type=int, default=100, help="resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=fit)


def fit(args: argparse.Namespace) -> int:
    """Fit a law to a CSV or to a lab's runs; print its parameters, intervals and errors."""
    check_counts(args, bootstrap=0)
    if (args.csv is None) == (args.lab is None):
        raise UsageError("--lab", "give a CSV file or --lab LAB (one of them)")
    lab_only = [flag for flag, given in (("--experiment", args.experiment), ("--holdout", args.holdout),
                                         ("--write", args.write)) if given]
    if args.lab is None and lab_only:
        raise UsageError(lab_only[0], "--experiment, --holdout and --write go with --lab", "Pass --lab LAB")
    source = args.csv or args.lab
    try:
        return fit_lab(args) if args.lab is not None else fit_csv(args)
    except ConfigError:
        raise  # already one line with its field; `call` makes it a UsageError
    except ValueError as err:  # the fitters and the points refuse data that cannot be fitted, saying why
        raise UsageError(source, str(err)) from None


def fit_csv(args: argparse.Namespace) -> int:
    import pandas as pd

    from stabilitylab.analysis import scaling

    try:
        table = pd.read_csv(args.csv)
    except OSError as err:
        raise UsageError(args.csv, f"cannot read it ({err.strerror or err})", "Pass a CSV file, one row per point"
                         ) from None
    law = scaling.TEST_TIME_FORMS.get(args.form) if args.law == "test-time" else {
        "chinchilla": scaling.CHINCHILLA, "training": scaling.TRAINING, "unified": scaling.UNIFIED}[args.law]
    if law is None:
        raise UsageError("--form", f"{args.form!r} is not a test-time form",
                         f"Choose one of {', '.join(scaling.TEST_TIME_FORMS)}")
    columns = fit_columns(args.columns, table, (*law.inputs, "L"), args.csv)
    print(scaling.fit_law(law, columns.pop("L"), bootstrap=args.bootstrap, seed=args.seed, **columns).table())
    return 0


def fit_lab(args: argparse.Namespace) -> int:
    """Fit the points of a lab's finished runs (analysis.fits) and print each fit."""
    from stabilitylab.analysis import fits, scaling

    points = fits.lab_points(args.lab, args.experiment)
    for run_id, why in points.unreadable.items():
        print(f"skipped {run_id}: unreadable ({why})")
    for run_id, status in points.skipped.items():
        print(f"skipped {run_id}: {status} (only finished runs are fitted)")
    finished = sorted(set(points.done["run"]))
    unknown = sorted(set(args.holdout) - set(finished))
    if unknown:
        raise UsageError("--holdout", f"{', '.join(unknown)} is not a finished run here",
                         f"Finished runs: {', '.join(finished)}")
    if args.law != "test-time":
        lab_fit = fits.fit_across_runs(points.done, args.law, args.holdout, bootstrap=args.bootstrap, seed=args.seed)
        for run_id in lab_fit.skipped:
            print(f"skipped {run_id}: no evaluation at T = μ_rec")
        print(f"{lab_fit.rows['run'].nunique()} runs, {len(lab_fit.rows)} points ({int(lab_fit.held.sum())} held "
              f"out)\n{lab_fit.fit.table()}")
        if args.write:
            print(f"wrote {fits.save_lab_fit(args.lab, lab_fit, args.experiment)}")
        return 0
    if args.holdout:
        raise UsageError("--holdout", "the test-time law is fitted per run (T > μ_rec is held out)",
                         "Use --holdout with training, chinchilla or unified")
    forms = list(scaling.TEST_TIME_FORMS) if args.form == "all" else [args.form]
    depth_fits = fits.fit_depth_curves(points.done, forms, bootstrap=args.bootstrap, seed=args.seed)
    for f in depth_fits:
        if f.fit is None:
            print(f"skipped {f.run} ({f.form}): {f.error}", file=sys.stderr)
            continue
        print(f"{f.run}: step {f.step}, fitted on T ≤ μ_rec = {f.mu_rec}, held out T > {f.mu_rec}\n{f.fit.table()}")
        if args.write:
            fits.save_depth_fit(points.runs[f.run], f)
    if not any(f.fit for f in depth_fits):
        raise UsageError("--law", "no run's depth curve could be fitted (reasons above)",
                         "Evaluate the runs at more depths T ≤ μ_rec (train.eval_depths, `stabilitylab eval`)")
    return 0


def fit_columns(spec: str, table, names: tuple[str, ...], source: str) -> dict:
    """--columns "N=Model Size,C=Training FLOP,L=loss" → {name: column} for `names`."""
    mapping: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, column = pair.partition("=")
        if not sep or name.strip() not in (*names, "C"):
            raise UsageError("--columns", f"cannot read {pair!r}",
                             f"Write NAME=column with NAME among {', '.join((*names, 'C'))}")
        mapping[name.strip()] = column.strip()

    def column(name: str):
        key = mapping.get(name, name)
        if key not in table.columns:
            raise UsageError("--columns", f"{source} has no column {key!r} for {name} (columns: "
                             f"{', '.join(map(str, table.columns))})", f"Map it with --columns {name}=<column>"
                             + (" or derive it with C=<FLOP column>" if name == "D" else ""))
        return table[key]

    derive_D = "D" in names and "D" not in mapping and "D" not in table.columns and "C" in mapping
    out = {name: column(name) for name in names if not (name == "D" and derive_D)}
    if derive_D:
        out["D"] = column("C") / (6 * out["N"])
    return out


# ---- analyze, check ------------------------------------------------------------------------------

def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="Jacobian spectral radius and Lyapunov exponents of the loop at checkpoints; "
                                       "recorded into the run")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--format", help=FORMAT_HELP)
    p.add_argument("--prefix-len", type=int, default=0, metavar="N", help=PREFIX_HELP)
    p.add_argument("--jacobian", action="store_true", help="the Jacobian spectrum (default: both)")
    p.add_argument("--lyapunov", action="store_true", help="the Lyapunov exponents (default: both)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="a run's checkpoint (default: the newest)")
    p.add_argument("--all-checkpoints", action="store_true", help="every indexed checkpoint of the run")
    p.add_argument("--depth", type=int, metavar="T", help="loop iterations (default: the run's probes.trace_depth, "
                                                          "else 2·μ_rec)")
    p.add_argument("--position", type=int, default=-1, metavar="P", help="token of the per-token view (default -1)")
    p.add_argument("--batch", type=int, metavar="N", help="sequences (default: the run's probes.batch_size, else 2)")
    p.add_argument("--seq-len", type=int, metavar="T", help="tokens per sequence (default: the run's data.seq_len, "
                                                            "else 64 random tokens)")
    p.add_argument("--seed", type=int, help="random tokens and h_0 (default: the run's train.seed, else 0)")
    p.add_argument("--tokens", metavar="FILE.npy", help="a (batch, seq_len + 1) integer array to analyse on")
    p.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")
    add_lab(p, "lab holding a run id")
    p.set_defaults(handler=analyze)


def analyze(args: argparse.Namespace) -> int:
    """Analyse, print, record into the run (when the target is one), exit 1 if an analysis failed."""
    from stabilitylab.analyze import analyze as analyze_target
    from stabilitylab.analyze import record
    from stabilitylab.targets import checkpoint_steps, load_target, read_tokens

    check_counts(args, depth=1, batch=1, seq_len=1, prefix_len=0)
    if args.all_checkpoints and args.checkpoint is not None:
        raise UsageError("--all-checkpoints", "and --checkpoint both pick checkpoints", "Pass one of them")
    tokens = read_tokens(args.tokens) if args.tokens else None
    first = load_target(args.target, args.lab, args.checkpoint, args.format, args.prefix_len)
    targets = [first]
    if args.all_checkpoints:
        if first.run is None:
            raise UsageError("--all-checkpoints", f"{first.label} is not in a run", "Pass a run, or drop the flag")
        targets = [first if step == first.step else load_target(first.run.path, args.lab, step)
                   for step in checkpoint_steps(first.run)]
    if first.run is not None and first.run.alive():
        raise UsageError(str(first.run.path), "is being written by a live trainer", "Analyse it once it has stopped")
    both = not (args.jacobian or args.lyapunov)
    results = []
    for target in targets:
        results.append(analyze_target(target, jacobian=both or args.jacobian, lyapunov=both or args.lyapunov,
                                      depth=args.depth, position=args.position, batch_size=args.batch,
                                      seq_len=args.seq_len, seed=args.seed, tokens=tokens))
        print(results[-1].text())
    if first.run is not None:
        record(first.run, results)
        print(f"recorded in {first.run.path}")
    if args.out:
        try:
            Path(args.out).write_text(json.dumps({"results": [r.to_dict() for r in results]}, indent=2) + "\n")
        except OSError as err:
            raise UsageError("--out", f"cannot write {args.out}: {err.strerror}", "Pass a writable path") from None
    return 1 if any(r.error for r in results) else 0


def add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check stability bounds (ρ(Ā), norms, growth, Jacobian, Lyapunov, depth "
                                     "loss); exit 1 if one fails")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--format", help=FORMAT_HELP)
    p.add_argument("--prefix-len", type=int, default=0, metavar="N", help=PREFIX_HELP)
    p.add_argument("--bounds", required=True, metavar="FILE", help="bounds TOML, e.g. checks/bounds.toml")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="a run's checkpoint (default: the newest)")
    p.add_argument("--tokens", metavar="FILE.npy", help="a (batch, seq_len + 1) integer array to check on")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML, one testcase per bound")
    add_lab(p, "lab holding a run id")
    p.set_defaults(handler=check)


def check(args: argparse.Namespace) -> int:
    """0: every bound holds; 1: one fails; 2: bad input (main)."""
    from stabilitylab.analysis.bounds import load_bounds
    from stabilitylab.targets import check_target, read_tokens

    check_counts(args, prefix_len=0)
    bounds, settings = load_bounds(args.bounds)
    tokens = read_tokens(args.tokens) if args.tokens else None
    report = check_target(args.target, bounds, settings, tokens, args.lab, args.checkpoint, args.format,
                          args.prefix_len)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    if args.junit:
        try:
            Path(args.junit).write_text(report.junit())
        except OSError as err:
            raise UsageError("--junit", f"cannot write {args.junit}: {err.strerror}", "Pass a writable path") from None
    return 0 if report.passed else 1


# ---- exit -----------------------------------------------------------------------------------------

def add_exit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exit", help="adaptive exit: per-token exit depth under Huginn's criteria and an exit gate, "
                                    "loss vs mean depth, compute saved, predicted vs measured; recorded into the run")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--format", help=FORMAT_HELP)
    p.add_argument("--prefix-len", type=int, default=0, metavar="N", help=PREFIX_HELP)
    p.add_argument("--criterion", action="append", metavar="NAME",
                   help="latent, kl, entropy, argmax or gate (repeatable; default: all, gate where the model has one)")
    p.add_argument("--eps", action="append", type=float, metavar="X",
                   help="thresholds for latent, kl and entropy (repeatable; default: per-criterion grids); for argmax "
                        "(k steps) or gate (q) when it is the only --criterion")
    p.add_argument("--max-depth", type=int, metavar="N", help="loop iterations to run (default 2·μ_rec)")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="a run's checkpoint (default: the newest)")
    p.add_argument("--batch", type=int, default=2, metavar="N", help="sequences (default 2)")
    p.add_argument("--seq-len", type=int, metavar="T", help="tokens per sequence (default: the run's data.seq_len, "
                                                            "else 64 random tokens)")
    p.add_argument("--seed", type=int, help="random tokens and h_0 (default: the run's train.seed, else 0)")
    p.add_argument("--tokens", metavar="FILE.npy", help="a (batch, seq_len + 1) integer array to measure on")
    p.add_argument("--out", metavar="FILE.json", help="also write the report as JSON")
    add_lab(p, "lab holding a run id")
    p.set_defaults(handler=exit_)


def exit_(args: argparse.Namespace) -> int:
    """Measure adaptive exit on a target, print it, record it into the run (when it is one)."""
    from stabilitylab.analysis import exits
    from stabilitylab.model.interface import has_loop
    from stabilitylab.targets import load_target, read_tokens

    check_counts(args, max_depth=2, batch=1, seq_len=1, prefix_len=0)
    criteria = tuple(dict.fromkeys(args.criterion or exits.CRITERIA))
    unknown = [c for c in criteria if c not in exits.CRITERIA]
    if unknown:
        raise UsageError("--criterion", f"{unknown[0]!r} is not a criterion", f"Choose from {', '.join(exits.CRITERIA)}")
    alone = criteria[0] if len(criteria) == 1 else None
    if args.eps and alone == "argmax" and any(x < 1 or x != int(x) for x in args.eps):
        raise UsageError("--eps", "argmax takes a whole number of steps k ≥ 1", "Pass --criterion argmax alone with "
                                                                                "--eps 1, 2, ...")
    if args.eps and any(x <= 0 for x in args.eps):
        raise UsageError("--eps", "thresholds must be > 0", "Pass positive values")
    if args.eps and alone == "gate" and any(x > 1 for x in args.eps):
        raise UsageError("--eps", "the gate's q is a probability in (0, 1]", "Pass --eps 0.9 or the like")
    tokens = read_tokens(args.tokens) if args.tokens else None
    target = load_target(args.target, args.lab, args.checkpoint, args.format, args.prefix_len)
    if not has_loop(target.model):
        raise UsageError(str(target.path), "is a GPT baseline (looped = false): it has no loop to exit from",
                         "Pass a looped model")
    if target.run is not None and target.run.alive():
        raise UsageError(str(target.path), "is being written by a live trainer", "Measure it once it has stopped")
    if "gate" in criteria and args.criterion and not hasattr(target.model, "exit_probability"):
        raise UsageError("--criterion", f"{target.label} has no exit gate", "Drop --criterion gate")
    batch = target.batch(args.batch, args.seq_len, args.seed, tokens)
    eps = {c: tuple(args.eps) for c in criteria if c in ("latent", "kl", "entropy") or c == alone} if args.eps else None
    report = exits.measure(target.model, batch.tokens, batch.targets, args.max_depth, criteria, eps, h0=batch.h0,
                           target=target.label, step=target.step)
    print(report.text())
    if target.run is not None:
        exits.record(target.run, [report])
        print(f"recorded in {target.run.path}")
    if args.out:
        try:
            Path(args.out).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        except OSError as err:
            raise UsageError("--out", f"cannot write {args.out}: {err.strerror}", "Pass a writable path") from None
    return 0


# ---- events ---------------------------------------------------------------------------------------

def add_events(sub: argparse._SubParsersAction) -> None:
    from stabilitylab.analysis.events import WarningRules

    p = sub.add_parser("events", help="loss spikes, divergence and early warnings (with lead times) of runs")
    p.add_argument("target", help="a run (directory, or run id inside --lab) or a lab (every run in it)")
    add_lab(p, "lab holding a run id")
    p.add_argument("--write", action="store_true",
                   help="log early_warning events (and spikes / divergence the run lacks) into each run, and "
                        "the report as its result 'events'; what the trainer recorded stays")
    defaults = WarningRules()
    p.add_argument("--rho", type=float, default=defaults.rho, help="warn at ρ(Ā) ≥ this (default %(default)g)")
    p.add_argument("--rate", type=float, default=defaults.rate,
                   help="warn at a loop-trace contraction rate q ≥ this (default %(default)g)")
    p.add_argument("--horizon", type=float, default=defaults.horizon,
                   help="warn when ‖h_T‖'s trend reaches the bound within this many steps (default %(default)g)")
    p.add_argument("--patience", type=int, default=defaults.patience,
                   help="measurements in a row a signal must hold for (default %(default)d)")
    p.add_argument("--forecast-horizon", type=float, default=defaults.forecast_horizon,
                   help="forecast: warn when a trend reaches 1 within this many steps (default %(default)g)")
    p.add_argument("--forecast-start", type=int, default=defaults.forecast_start,
                   help="forecast: no trend fires before this step (default %(default)d)")
    p.add_argument("--loop-level", type=float, default=defaults.loop_level,
                   help="combined warning: the loop's median radius must exceed this (default %(default)g)")
    p.add_argument("--score", action="store_true",
                   help="score each warning over the runs: recall, precision, median and 10th-percentile "
                        "lead in steps and tokens, false alarms per 1000 healthy steps")
    p.add_argument("--censor", type=float, metavar="STEPS",
                   help="with --score: a false alarm within STEPS of a run's end counts as censored, not "
                        "as a false alarm (the run ended too soon to tell)")
    p.set_defaults(handler=events)


def events(args: argparse.Namespace) -> int:
    """Analyse each run's history (analysis.events), print what it found, and with --write
    log it into each run that no process is training."""
    from stabilitylab.analysis.events import WarningRules, analyse_run, warning_scores, warning_table, write_events
    from stabilitylab.store import DB_NAME, StoreError, find_runs, open_run

    rules = WarningRules(rho=args.rho, rate=args.rate, horizon=args.horizon, patience=args.patience,
                         forecast_horizon=args.forecast_horizon, forecast_start=args.forecast_start,
                         loop_level=args.loop_level)
    if args.censor is not None and not args.score:
        raise UsageError("--censor", "counts censored false alarms in the score table", "Add --score")
    if args.censor is not None and not args.censor >= 0:
        raise UsageError("--censor", f"must be a number of steps ≥ 0, got {args.censor}", "Pass e.g. --censor 50")
    target = Path(args.target)
    lab_runs = not (target / DB_NAME).is_file() and target.is_dir() and find_runs(target)
    reports = []
    for run in lab_runs or [open_run(args.target, args.lab)]:
        try:
            report = analyse_run(run, rules)
        except (StoreError, ValueError) as err:
            print(f"{run.id}: skipped ({err})")
            continue
        reports.append(report)
        print(events_text(run.id, run.status(), report))
        if args.write and run.alive():
            print("  not written: a process is training it")
        elif args.write:
            try:
                added = write_events(run, report)
            except StoreError as err:  # e.g. a database that fails its integrity check
                print(f"  not written: {err}")
                continue
            print("  wrote " + ", ".join(f"{n} {kind}" for kind, n in added.items())
                  + " event(s) and the result 'events'")
    if len(reports) > 1 or args.score:
        table = warning_scores(reports, args.censor) if args.score else warning_table(reports)
        print("\nwarnings over these runs (recall = early / diverged, precision = early / fired):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


def events_text(run_id: str, status: dict, report) -> str:
    """A run's spikes, divergence and warnings, a few lines."""
    d = report.divergence
    lines = [f"{run_id}  [{status['status']}]  " + (f"diverges at step {d.step}: {d.detail}" if d else "no divergence")]
    spikes = report.spikes
    lines.append(f"  spikes    {len(spikes)}" + (" at steps " + ", ".join(str(s.step) for s in spikes[:10])
                                                 + (", …" if len(spikes) > 10 else "") if spikes else ""))
    if report.first:
        w = report.first[0]
        lines.append(f"  warning   step {w.step} by {', '.join(x.signal for x in report.first)}; {lead_text(w)}")
    else:
        lines.append("  warning   none" + (" (missed)" if d else ""))
    outcomes = report.outcomes()
    fired = {w.signal: w for w in report.warnings}
    for signal in report.signals:
        w = fired.get(signal)
        lead = "" if w is None or w.lead_steps is None else f"{w.lead_steps:+d}"
        lines.append(f"    {signal:<12} {outcomes[signal]:<12} " + (f"step {w.step:<6} lead {lead:<6} {w.detail}"
                                                                     if w else ""))
    return "\n".join(line.rstrip() for line in lines)


def lead_text(w) -> str:
    """How far a warning came before the divergence, or that there was none (yet)."""
    if w.lead_steps is None:
        return "no divergence: a false alarm" if w.outcome == "false_alarm" else "no divergence yet (the run has not ended)"
    seen = (f" ({w.lead_tokens:.4g} tokens, {w.lead_flops:.3g} FLOPs)"
            if w.lead_tokens is not None and w.lead_flops is not None else "")
    return f"{abs(w.lead_steps)} steps{seen} {'before' if w.lead_steps >= 0 else 'after'} the divergence"


__all__ = ["add_fit", "fit", "fit_columns", "add_analyze", "analyze", "add_check", "check", "add_exit", "exit_", "add_events", "events",
           "events_text", "lead_text"]
