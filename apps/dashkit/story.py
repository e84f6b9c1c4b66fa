"""What a lab is about, from its runs table alone: each experiment's grid (the config fields
its sweep varies), the matched pairs it holds (runs whose configs differ only in the
contrast field: the injection above all), a one-line verdict per pair, and the outcome of
every grid cell. Pure pandas over `store.list_runs` columns: no Streamlit, no store reads.

Constrained injections keep ρ(Ā) < 1 by construction (parcae, parcae-zoh, stable-dense);
the others (add: Ā = I; concat, free-diagonal: free) do not (model/injection.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dashkit import names

CONSTRAINED = ("parcae", "parcae-zoh", "stable-dense")
INJECTION = names.config_column("injection")
OUTCOMES = ("finished", "spiked", "diverged")  # a cell's runs: finished cleanly, with loss spikes, diverged


def is_seed(column: str) -> bool:
    """Seed columns never define a group: seeds are repeats of one configuration."""
    return column == "seed" or column.endswith(".seed") or column.endswith(".seeds")


def config_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c.startswith(names.PREFIX) and c != f"{names.PREFIX}name"]


def _key(value) -> str:
    """A hashable, comparable text for any config value (lists and None included)."""
    if isinstance(value, float) and math.isnan(value):
        return "None"
    return str(value)


def keyed(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The columns as comparable text (one pass over plain Python objects: pandas' per-column
    map costs ~2 ms a column, and a lab has ~100 config columns)."""
    values = table[columns].to_numpy(dtype=object)
    return pd.DataFrame([[_key(v) for v in row] for row in values], columns=columns, index=table.index,
                        dtype=object)


def varying(table: pd.DataFrame, seeds: bool = False) -> list[str]:
    """Config columns whose value differs between the rows (seeds left out unless asked)."""
    columns = [c for c in config_columns(table) if seeds or not is_seed(c)]
    values = table[columns].to_numpy(dtype=object)
    return [c for c, column in zip(columns, values.T) if len({_key(v) for v in column}) > 1]


def grid_fields(runs: pd.DataFrame) -> list[str]:
    """The config columns one experiment's sweep varies, seeds aside, in the order its
    sweep cells name them ("injection=concat,lr=0.01,seed=0"); a field that varies only
    because another does (steps set by a FLOP budget) is left out when the cells say so."""
    fields = varying(runs)
    cells = runs["sweep_cell"].dropna().astype(str)
    if cells.empty:
        return fields
    order = [part.split("=", 1)[0] for part in cells.iloc[0].split(",") if "=" in part]
    named = [f for key in order for f in fields if f.split(".")[-1] == key]
    return named or fields


def short(column: str) -> str:
    """'config.train.lr' -> 'lr'."""
    return column.split(".")[-1]


def label(row: pd.Series | dict, fields: list[str]) -> str:
    """'injection=concat, lr=0.01' for the given fields of a run."""
    return ", ".join(f"{short(f)}={fmt(row[f])}" for f in fields) or "all runs"


def fmt(value) -> str:
    """A config value as shown: floats to 3 significant digits (0.0025, 1e+12)."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return _key(value)


def constrained(injection) -> bool:
    return str(injection) in CONSTRAINED


@dataclass
class Pairs:
    """An experiment's matched pairs: rows of `left` and `right` run ids that share every
    config field but `field`; left the unconstrained (or first) value, right the other."""

    experiment: str
    field: str  # the contrast: config.model.injection, or the one two-valued field of the grid
    left_value: str
    right_value: str
    frame: pd.DataFrame  # columns: cell (the shared fields), left, right (run ids)


def _order(values: list[str], field: str) -> list[str]:
    """Unconstrained first when the contrast is the injection; else the sorted order."""
    values = sorted(values)
    if field == INJECTION:
        values.sort(key=constrained)
    return values


def matched_pairs(runs: pd.DataFrame, experiment: str) -> list[Pairs]:
    """Matched pairs of one experiment's runs (seed included in what must match). The
    contrast is the injection when the sweep varies it (one Pairs per unconstrained ×
    constrained injection, or per neighbouring pair of injections when all are of one
    kind); otherwise a grid field with exactly two values (prelude norm on/off, per-batch
    vs per-sequence depth). No contrast: no pairs."""
    members = runs[runs["experiment"] == experiment]
    fields = grid_fields(members)
    if INJECTION in fields:
        field = INJECTION
    else:
        two = [f for f in fields if keyed(members, [f])[f].nunique() == 2]
        if not two:
            return []
        field = two[0]
    values = _order(keyed(members, [field])[field].unique().tolist(), field)
    if field == INJECTION and any(map(constrained, values)) and not all(map(constrained, values)):
        combos = [(a, b) for a in values if not constrained(a) for b in values if constrained(b)]
    else:
        combos = list(zip(values, values[1:]))
    rest = [c for c in varying(members, seeds=True) if c != field]
    if "seed" in members and not any(map(is_seed, rest)) and members["seed"].map(_key).nunique() > 1:
        rest.append("seed")  # a seed given to the run but not in its config still tells the runs apart
    text = keyed(members, [field, *rest]).set_axis(members["run_id"].to_numpy())
    keys = pd.Series(["|".join(row) for row in text[rest].to_numpy()], index=text.index)
    shown = [c for c in rest if c in fields or is_seed(c)]
    cells = dict(zip(members["run_id"], (label(dict(zip(shown, row)), shown)
                                         for row in members[shown].to_numpy(dtype=object))))
    out = []
    for a, b in combos:
        left = pd.DataFrame({"key": keys[text[field] == a], "left": text.index[text[field] == a]})
        right = pd.DataFrame({"key": keys[text[field] == b], "right": text.index[text[field] == b]})
        both = left.merge(right, on="key").drop_duplicates("key")
        if not both.empty:
            out.append(Pairs(experiment, field, a, b, pd.DataFrame({
                "cell": [cells[r] for r in both["left"]], "left": both["left"].to_numpy(),
                "right": both["right"].to_numpy()})))
    return out


def first_pair(runs: pd.DataFrame) -> tuple[str, str] | None:
    """The lab's headline pair (unconstrained, constrained): among every experiment's
    injection pairs, preferably one where the unconstrained run diverged with ρ(Ā) > 1 and
    the constrained one finished (the lab's story in two runs), else one where it merely
    diverged, else the first pair of any contrast."""
    status = dict(zip(runs["run_id"], runs["status"]))
    rho = dict(zip(runs["run_id"], runs["max_rho"]))
    every = [p for e in runs["experiment"].dropna().unique() for p in matched_pairs(runs, e)]
    injection = [p for p in every if p.field == INJECTION and not constrained(p.left_value)
                 and constrained(p.right_value)]
    candidates = [(a, b) for p in injection or every for a, b in zip(p.frame["left"], p.frame["right"])]
    if not candidates:
        return None

    def rank(pair: tuple[str, str]) -> int:
        telling = status[pair[0]] == "diverged" and status[pair[1]] == "finished"
        return 0 if telling and rho[pair[0]] > 1 else 1 if telling else 2

    return min(candidates, key=rank)


def loss_shown(row) -> float:
    """The loss a run ended on, as a reader expects it: its final loss, or where that was
    NaN/inf (a diverged run), the last finite loss it logged (its status says it diverged)."""
    final = row["final_loss"]
    return final if np.isfinite(final) else row.get("last_finite_loss", math.nan)


def losses_shown(runs: pd.DataFrame) -> np.ndarray:
    """loss_shown of every row of a runs table."""
    final = runs["final_loss"].to_numpy(float)
    return np.where(np.isfinite(final), final, runs["last_finite_loss"].to_numpy(float))


def loss_text(row) -> str:
    """loss_shown as text, saying so where it is the last finite loss: '2.91 (last finite)'."""
    shown = loss_shown(row)
    if not np.isfinite(shown):
        return "–"
    return f"{shown:.3g}" if np.isfinite(row["final_loss"]) else f"{shown:.3g} (last finite)"


def verdict(left: pd.Series, right: pd.Series, left_name: str, right_name: str) -> str:
    """One line on a matched pair: who diverged (and with what ρ(Ā)), else who ended lower."""
    def died(r: pd.Series, name: str) -> str:
        rho = f", ρ(Ā) {r['max_rho']:.3g}" if np.isfinite(r["max_rho"]) else ""
        return f"{name} diverged @ {int(r['status_step'])}{rho}"

    ld, rd = left["status"] == "diverged", right["status"] == "diverged"
    if ld and rd:
        return f"both diverged ({left_name} @ {int(left['status_step'])}, {right_name} @ {int(right['status_step'])})"
    if ld or rd:
        dead, alive = (left, right) if ld else (right, left)
        names_ = (left_name, right_name) if ld else (right_name, left_name)
        return f"{died(dead, names_[0])}; {names_[1]} {alive['status']}"
    if left["status"] != "finished" or right["status"] != "finished":
        return f"{left_name} {left['status']}, {right_name} {right['status']}"
    gap = right["final_loss"] - left["final_loss"]
    if not np.isfinite(gap):
        return "both finished"
    better = right_name if gap < 0 else left_name
    unstable = [n for r, n in ((left, left_name), (right, right_name)) if r["max_rho"] >= 1]
    tail = f"; {' and '.join(unstable)} reached ρ(Ā) ≥ 1" if unstable else ""
    return f"both finished; {better} lower loss by {abs(gap):.3g}{tail}"


def pair_table(runs: pd.DataFrame, pairs: Pairs, extras: pd.DataFrame) -> pd.DataFrame:
    """One row per matched pair: the shared cell, both sides' status, max ρ(Ā), max ‖h_T‖,
    final loss and λ₁ (`extras`, by run id: lambda1, spikes), and the verdict."""
    table = runs.set_index("run_id").join(extras)
    rows = []
    for cell, a, b in pairs.frame.itertuples(index=False):
        left, right = table.loc[a], table.loc[b]
        row = {"cell": cell}
        for side, r, name in (("L", left, pairs.left_value), ("R", right, pairs.right_value)):
            row.update({f"{name} status": r["status"], f"{name} ρ(Ā)": r["max_rho"],
                        f"{name} max ‖h_T‖": r["max_state_norm"], f"{name} loss": loss_shown(r),
                        f"{name} λ₁": r.get("lambda1", np.nan)})
        row["verdict"] = verdict(left, right, pairs.left_value, pairs.right_value)
        row["left"], row["right"] = a, b
        rows.append(row)
    return pd.DataFrame(rows)


def summary_line(runs: pd.DataFrame, pairs: Pairs) -> str:
    """'concat diverged in 5 of 10 pairs, parcae in 2 of 10'."""
    status = runs.set_index("run_id")["status"]
    n = len(pairs.frame)
    parts = [f"{v} diverged in {int((status[pairs.frame[side]] == 'diverged').sum())} of {n}"
             for side, v in (("left", pairs.left_value), ("right", pairs.right_value))]
    return f"{short(pairs.field)} {pairs.left_value} vs {pairs.right_value}: " + ", ".join(parts) + " matched pairs"


def outcome(status: str, spikes: float) -> str:
    if status == "diverged" or status == "failed":
        return "diverged"
    return "spiked" if spikes and spikes > 0 else "finished"


def outcome_grid(runs: pd.DataFrame, extras: pd.DataFrame, experiment: str) -> pd.DataFrame | None:
    """Per grid cell of a sweep with two or more grid fields: rows = the first field's
    values, columns = the others'; each cell counts its seeds by outcome. Columns of the
    long frame: row, col, n, finished, spiked, diverged, worst (0 finished … 2 diverged)."""
    members = runs[runs["experiment"] == experiment].set_index("run_id").join(extras)
    fields = grid_fields(members)
    if len(fields) < 2:
        return None
    members = members.assign(outcome=[outcome(s, k) for s, k in zip(members["status"], members.get("spikes", 0))])
    members["row"] = members[fields[0]].map(fmt)
    members["col"] = [label(r, fields[1:]).replace(", ", "\n") if len(fields) > 2 else fmt(r[fields[1]])
                      for _, r in members.iterrows()]
    counts = members.groupby(["row", "col"])["outcome"].value_counts().unstack(fill_value=0)
    counts = counts.reindex(columns=list(OUTCOMES), fill_value=0).reset_index()
    counts["n"] = counts[list(OUTCOMES)].sum(axis=1)
    counts["worst"] = np.select([counts["diverged"] > 0, counts["spiked"] > 0], [2, 1], 0)
    counts.attrs["fields"] = [short(f) for f in fields]
    order = {f: sorted(members[f].dropna().unique().tolist(), key=sortable) for f in fields[:2]}
    counts.attrs["rows"] = [fmt(v) for v in order[fields[0]]]
    counts.attrs["cols"] = [fmt(v) for v in order[fields[1]]] if len(fields) == 2 else sorted(counts["col"].unique())
    return counts


def sortable(value):
    """A sort key that puts numbers in numeric order before text."""
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))
