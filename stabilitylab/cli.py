"""`stabilitylab <verb>`: the lab's command line.

Each verb is a `_cmd_<verb>(args)` handler plus an `_add_<verb>(subparsers)` parser
builder; `main` wires them. Handlers return the process exit code. Errors that a
user can fix (a bad config, a missing file) are printed as one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from stabilitylab.config import ConfigError


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the lab's quick demonstration")
    p.add_argument("--injection", default="all", help="injection to trace, or all")
    p.add_argument("--depth", type=int, default=8, help="loop iterations to trace")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
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
        print(f"\n{name}: ‖e‖ = {trace['e_norm_mean']:.3f}, ‖h_0‖ = {trace['h0_norm_mean']:.3f}")
        print(f"{'t':>3} {'mean ‖h_t‖':>12} {'max ‖h_t‖':>12} {'‖h_t−h_t-1‖':>12} {'rel. resid.':>12} {'cos':>8}")
        for t in range(args.depth):
            print(f"{t + 1:>3} {trace['state_norm_mean'][t]:12.4f} {trace['state_norm_max'][t]:12.4f} "
                  f"{trace['delta_norm_mean'][t]:12.4f} {trace['rel_residual'][t]:12.4f} "
                  f"{trace['cosine'][t]:8.4f}")
    return 0


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a scaling law to a CSV of losses")
    p.add_argument("csv", help="CSV file, one row per point")
    p.add_argument("--law", required=True, choices=("chinchilla", "training", "test-time", "unified"))
    p.add_argument("--form", default="exp", help="test-time form: exp, power1p, power or pure-power")
    p.add_argument("--columns", default="",
                   help="NAME=column pairs, comma separated, for the names N, D, T, mu_rec, L (default: the "
                        "column of the same name); C=column gives D = C / (6 N) when there is no D")
    p.add_argument("--bootstrap", type=int, default=100, help="resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_fit)


def _cmd_fit(args: argparse.Namespace) -> int:
    """Fit a law to a CSV and print its parameters, intervals and in-sample error."""
    import pandas as pd

    from stabilitylab.analysis import scaling

    table = pd.read_csv(args.csv)
    try:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stabilitylab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (_add_demo, _add_fit):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"stabilitylab {args.verb}: {err}", file=sys.stderr)
        return 2
