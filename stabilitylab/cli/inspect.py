"""The verbs that look at models and labs without changing a result: trace, runs, export,
compact, dashboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from stabilitylab import records
from stabilitylab.cli.common import UsageError, add_lab, check_counts, run_table
from stabilitylab.store import DEFAULT_LAB, EXPORT_FORMATS


def add_trace(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="print the loop trace of a target, or of fresh models, one per injection")
    p.add_argument("target", nargs="?", help="a run, checkpoint file or checkpoint directory (parcae_lm, hrm_text, "
                                             "huginn); default: fresh LoopedLMs")
    p.add_argument("--format", help="with TARGET: force the format of a checkpoint directory")
    p.add_argument("--prefix-len", type=int, default=0, metavar="N",
                   help="with an hrm_text TARGET: positions 0..N-1 are the instruction of the prefix-LM mask")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="with TARGET: a run's checkpoint (default: newest)")
    p.add_argument("--injection", default="all", help="without TARGET: injection to trace, or all")
    p.add_argument("--depth", type=int, help="loop iterations to trace (default 8; with TARGET 2·μ_rec)")
    p.add_argument("--batch", type=int, default=4, metavar="N", help="with TARGET: sequences (default 4)")
    p.add_argument("--seed", type=int, default=0)
    add_lab(p, "lab holding a run id")
    p.set_defaults(handler=trace)


def trace(args: argparse.Namespace) -> int:
    """A short instrumented forward pass: the loop trace of TARGET through the loop interface
    (analysis/trace.py), or of a fresh LoopedLM per injection."""
    import torch

    check_counts(args, depth=1, batch=1, prefix_len=0)
    if args.target is not None:
        from stabilitylab.analysis.trace import interface_trace
        from stabilitylab.targets import load_target

        target = load_target(args.target, args.lab, args.checkpoint, args.format, args.prefix_len)
        depth = args.depth or 2 * target.model.mu_rec
        batch = target.batch(args.batch, seed=args.seed)
        print_trace(target.label, interface_trace(target.model, batch.tokens, depth, batch.h0).to_dict(), depth)
        return 0
    from stabilitylab.config import ModelConfig
    from stabilitylab.model import LoopedLM

    depth = args.depth or 8
    torch.manual_seed(args.seed)
    tokens = torch.randint(0, 256, (4, 64))
    names = [args.injection] if args.injection != "all" else ["add", "concat", "free-diagonal", "parcae"]
    for name in names:
        model = LoopedLM(ModelConfig(injection=name, init_state="seeded")).eval()
        with torch.no_grad():
            out = model(tokens, depth=depth, trace=True)
        print_trace(name, out.trace.to_dict(), depth)
    return 0


def print_trace(name: str, t: dict, depth: int) -> None:
    print(f"\n{name}: ‖e‖ = {t[records.E_NORM_MEAN]:.3f}, ‖h_0‖ = {t[records.H0_NORM_MEAN]:.3f}")
    print(f"{'t':>3} {'mean ‖h_t‖':>12} {'max ‖h_t‖':>12} {'‖h_t−h_t-1‖':>12} {'rel. resid.':>12} {'cos':>8}")
    for i in range(depth):
        print(" ".join([f"{i + 1:>3}", *(f"{t[f][i]:12.4f}" for f in records.TRACE_FIELDS[:-1]),
                        f"{t[records.TRACE_COSINE][i]:8.4f}"]))


def add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list the runs of a lab: status, steps, final loss, max ρ(Ā)")
    p.add_argument("lab", nargs="?", default=str(DEFAULT_LAB), help=f"lab directory (default: {DEFAULT_LAB}/)")
    p.set_defaults(handler=runs)


def runs(args: argparse.Namespace) -> int:
    """One line per run; a run that cannot be read says why."""
    from stabilitylab.store import list_runs

    print(run_table(row._asdict() for row in list_runs(args.lab).itertuples(index=False)))
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's tables to CSV or Parquet files")
    p.add_argument("run", help="run directory, or run id inside --lab")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="csv")
    p.add_argument("--out", default=None, help="output directory (default: exports/<run id>)")
    add_lab(p, "lab holding RUN")
    p.set_defaults(handler=export)


def export(args: argparse.Namespace) -> int:
    from stabilitylab.store import export_run, open_run

    run = open_run(args.run, args.lab)
    for path in export_run(run, args.out or f"exports/{run.id}", args.format):
        print(path)
    return 0


def add_compact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="drop the checkpoints of finished runs, keeping every metric")
    p.add_argument("target", help="a run directory, or a lab (every run in it)")
    p.set_defaults(handler=compact)


def compact(args: argparse.Namespace) -> int:
    """Compact a run or every run of a lab; a run that cannot be compacted (a live writer, a
    damaged database) is named with the reason and the others go on."""
    from stabilitylab.store import compact_lab

    for run_dir, freed in compact_lab(args.target):
        print(f"{run_dir}: {freed / 2**20:.1f} MiB freed" if isinstance(freed, int) else f"skipped {run_dir}: {freed}")
    return 0


def add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="open the dashboard on a lab (Streamlit, in the browser)")
    p.add_argument("lab", nargs="?", help="lab directory (default: the reference lab, data/reference-lab)")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.set_defaults(handler=dashboard)


APPS = Path(__file__).resolve().parents[2] / "apps"  # beside the package in the repository


def dashboard_command(lab: str | None, port: int) -> list[str]:
    """`python -m streamlit run apps/dashboard.py ... -- --lab LAB`: the dashboard lives
    beside the package in the repository (apps/ is not installed). The script health check
    is on so apps/warm.py can run the app once in the fresh server (see dashboard)."""
    app = APPS / "dashboard.py"
    if not app.is_file():
        raise UsageError("dashboard", f"{app} is missing: the dashboard ships with the repository",
                         "Run it from a clone")
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
            "--browser.gatherUsageStats", "false", "--server.scriptHealthCheckEnabled", "true",
            "--", *(["--lab", lab] if lab else [])]


def dashboard(args: argparse.Namespace) -> NoReturn:
    """Become the Streamlit server (exec), so a signal to this process reaches it; beside
    it, apps/warm.py runs the app once in the fresh server, so the first visit finds the
    imports done and the lab read (it exits by itself)."""
    import os
    import subprocess

    command = dashboard_command(args.lab, args.port)
    host = os.environ.get("STREAMLIT_SERVER_ADDRESS") or "127.0.0.1"
    subprocess.Popen([sys.executable, str(APPS / "warm.py"), f"http://{host}:{args.port}"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    os.execv(command[0], command)


__all__ = ["add_trace", "trace", "print_trace", "add_runs", "runs", "add_export", "export", "add_compact", "compact",
           "add_dashboard", "dashboard_command", "dashboard"]
