"""`stabilitylab <verb>`: the lab's command line.

    cli/train.py      data prepare, train, sweep, eval       (verbs that make runs)
    cli/inspect.py    trace, runs, export, compact, dashboard (verbs that look)
    cli/analysis.py   fit, analyze, check, exit, events         (verbs that analyse)
    cli/common.py     UsageError, the shared flags, the run summary line

Each verb is a handler `verb(args) -> exit code` plus an `add_verb(subparsers)` parser
builder. A handler parses, calls the room below (train, analysis, store) and prints what it
returns; the work and what it writes live there. A mistake the user can fix is a
UsageError (the rooms' ConfigError and StoreError become one at `call`): `main` prints it
as one line on stderr and exits 2. 0 means done, 1 a result that failed (a sweep cell, a
bound, an analysis).
"""

from __future__ import annotations

import argparse
import sys

from stabilitylab.cli import analysis, inspect, train
from stabilitylab.cli.common import UsageError, call
from stabilitylab.cli.inspect import dashboard_command

VERBS = (inspect.add_trace, train.add_data, train.add_train, train.add_sweep, train.add_eval, inspect.add_runs,
         inspect.add_export, inspect.add_compact, analysis.add_fit, analysis.add_analyze, analysis.add_check,
         analysis.add_exit, analysis.add_events, inspect.add_dashboard)  # in the order `stabilitylab --help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stabilitylab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return call(args.handler, args)
    except UsageError as err:
        print(f"stabilitylab {args.verb}: {err}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser", "UsageError", "dashboard_command"]
