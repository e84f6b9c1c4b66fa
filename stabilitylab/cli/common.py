"""What every verb shares: its one error type, the common flags, the run summary line."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Iterable, Mapping

import pandas as pd

from stabilitylab.config import ConfigError
from stabilitylab.store import DEFAULT_LAB, StoreError


class UsageError(ConfigError):
    """The one error a verb raises: a mistake the user can fix. `main` prints it as one line,
    "stabilitylab VERB: FLAG-OR-PATH: problem. fix", and exits 2.

    A handler raises it for its own flags; what the rooms below it report for the same kind
    of mistake (ConfigError, StoreError) becomes one at the verb boundary (`call`)."""

    @classmethod
    def of(cls, err: ConfigError | StoreError) -> "UsageError":
        """`err` as a UsageError with the same message."""
        if isinstance(err, UsageError):
            return err
        if isinstance(err, ConfigError):
            return cls(err.field, err.problem, err.fix, err.source)
        return cls(str(err.path), err.problem, f"Fix: {err.fix}" if err.fix else "")


Handler = Callable[[argparse.Namespace], int]


def call(handler: Handler, args: argparse.Namespace) -> int:
    """Run a verb's handler; a user's mistake reported from below leaves it as a UsageError.
    Anything else (a bug) keeps its traceback."""
    try:
        return handler(args)
    except (ConfigError, StoreError) as err:
        raise UsageError.of(err) from None


def check_counts(args: argparse.Namespace, **lowest: int) -> None:
    """Count flags (dest=lowest value allowed; a list flag checks each value): one below its
    lowest is a UsageError naming the flag, before any work starts."""
    for dest, low in lowest.items():
        values = getattr(args, dest)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value < low:
                flag = "--" + dest.replace("_", "-")
                raise UsageError(flag, f"must be ≥ {low}, got {value}", f"Pass {flag} {low} or more")


def add_lab(p: argparse.ArgumentParser, what: str = "lab directory") -> None:
    p.add_argument("--lab", default=str(DEFAULT_LAB), help=f"{what} (default: {DEFAULT_LAB}/)")


def add_sets(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help=f"override a field{example} (repeatable)")


# ---- a run in one line: `runs` lists them, `train` ends with one ---------------------------------

def run_table(summaries: Iterable[Mapping[str, Any]]) -> str:
    """A header and one line per run summary (store.SUMMARY_COLUMNS: Run.summary() or a row
    of list_runs): status, steps, final loss, max ρ(Ā), max ‖h_T‖ and why a run stopped."""
    rows = list(summaries)
    width = max([3, *(len(r["run_id"]) for r in rows)])
    lines = [f"{'run':<{width}}  {'status':<20} {'steps':>7} {'final loss':>11} {'max ρ(Ā)':>9} {'max ‖h_T‖':>10}"]
    for r in rows:
        if not r.get("readable", True):
            lines.append(f"{r['run_id']:<{width}}  unreadable: {r['error']}")
            continue
        status = r["status"] if r["status"] in ("running", "finished") else f"{r['status']}@{int(r['status_step'])}"
        if r["status"] == "running" and not r["alive"]:
            status = "running (no writer)"
        steps = "-" if pd.isna(r["last_step"]) else f"{int(r['last_step'])}"
        reason = f"  {r['status_reason']}" if r["status"] in ("diverged", "failed") else ""
        lines.append(f"{r['run_id']:<{width}}  {status:<20} {steps:>7} {_fixed(r['final_loss']):>11} "
                     f"{_fixed(r['max_rho']):>9} {r['max_state_norm']:>10.4g}{reason}")
    return "\n".join(lines)


def _fixed(x: float) -> str:
    """Four decimals, or four significant digits once that would not fit (an exploded ρ)."""
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


__all__ = ["UsageError", "call", "check_counts", "add_lab", "add_sets", "run_table"]
