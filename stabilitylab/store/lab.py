"""Operations over a lab (a directory of runs): finding and listing runs, reading scalars
across runs, compacting and exporting.

A run that cannot be read never stops a lab-wide operation: `list_runs` lists it with
readable=False and the reason, `compact_lab` reports it and compacts the others.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from stabilitylab import records
from stabilitylab.store.reader import SUMMARY_COLUMNS, Run
from stabilitylab.store.schema import CHECKPOINT_DIR, DB_NAME, LOCK_NAME, StoreError, existing_run, reading
from stabilitylab.store.writer import RunWriter

DEFAULT_LAB = Path("runs")
EXPORT_FORMATS = ("csv", "parquet")


def find_runs(lab: str | Path = DEFAULT_LAB) -> list[Run]:
    """The runs of a lab: directories holding run.db at lab/<run>/ or lab/<group>/<run>/,
    hidden ones skipped, sorted by run id (the path relative to the lab)."""
    lab = Path(lab)
    if not lab.is_dir():
        raise StoreError(lab, "no such lab directory", "train a run into it first, or pass the lab's path")
    dbs = [*lab.glob(f"*/{DB_NAME}"), *lab.glob(f"*/*/{DB_NAME}")]
    ids = sorted(db.parent.relative_to(lab).as_posix() for db in dbs)
    return [Run(lab / i, i) for i in ids if not any(p.startswith(".") for p in i.split("/"))]


def open_run(ref: str | Path, lab: str | Path = DEFAULT_LAB) -> Run:
    """A run by directory path, or by run id inside `lab`."""
    if (Path(ref) / DB_NAME).is_file():
        return Run(ref)
    if (Path(lab) / ref / DB_NAME).is_file():
        return Run(Path(lab) / ref, str(ref))
    raise StoreError(ref, f"no run here, nor at {Path(lab) / ref}",
                     "pass a run directory or a run id listed by `stabilitylab runs`")


def list_runs(lab: str | Path = DEFAULT_LAB, *, check: bool = False) -> pd.DataFrame:
    """One summary row per run (SUMMARY_COLUMNS, then config.* columns). A run that cannot
    be read is listed with readable=False and the reason in `error`. The summary reads a
    few pages; with `check`, every page is checked first (Run.check, about 2 ms per MiB here), so
    a run damaged where the summary does not look is unreadable too."""
    rows = []
    for run in find_runs(lab):
        try:
            if check:
                run.check()
            rows.append(run.summary())
        except (StoreError, OSError, ValueError) as err:
            rows.append({"run_id": run.id, "path": str(run.path), "readable": False, "error": str(err),
                         "alive": run.alive(), "token": run.token()})
    config = sorted({k for r in rows for k in r if k.startswith(records.CONFIG_PREFIX)})
    return pd.DataFrame(rows, columns=[*SUMMARY_COLUMNS, *config])


def lab_token(lab: str | Path = DEFAULT_LAB) -> tuple:
    """Changes when a run is added, removed or grows; a few stat calls per run."""
    return tuple((run.id, run.token()) for run in find_runs(lab))


def read_scalars(runs: Iterable[Run], names: Iterable[str] | None = None, *, start: int | None = None,
                 stop: int | None = None, stride: int = 1, wide: bool = False) -> pd.DataFrame:
    """Scalars of several runs: long (run, step, name, value), or wide with one row per
    (run, step) and one column per name."""
    names = None if names is None else list(names)
    ids, steps, labels, values = [np.empty(0, object)], [np.empty(0, np.int64)], [np.empty(0, object)], [np.empty(0)]
    for run in runs:
        s, n, v = run._scalar_arrays(names, start, stop, stride)
        ids.append(np.full(len(s), run.id, dtype=object))
        steps.append(s), labels.append(n), values.append(v)
    long = pd.DataFrame({"run": pd.array(np.concatenate(ids), dtype="str"), "step": np.concatenate(steps),
                         "name": pd.array(np.concatenate(labels), dtype="str"), "value": np.concatenate(values)})
    if not wide:
        return long
    table = long.pivot(index=["run", "step"], columns="name", values="value").reset_index()
    table.columns.name = None
    return table


def compact_run(run_dir: str | Path) -> int:
    """Make a finished run small enough to commit or share: drop its checkpoints (index
    rows and files), vacuum the database and remove the writer lock file. Every metric
    stays. Returns the bytes freed. A run with a live writer is refused."""
    run_dir = existing_run(run_dir)
    before = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    with RunWriter.attach(run_dir) as writer:
        for step in sorted({int(s) for s in Run(run_dir).checkpoints()["step"]}):
            writer.remove_checkpoint(step)
    with reading(run_dir / DB_NAME), contextlib.closing(sqlite3.connect(run_dir / DB_NAME)) as con:
        con.execute("VACUUM")
    (run_dir / LOCK_NAME).unlink(missing_ok=True)
    checkpoints = run_dir / CHECKPOINT_DIR
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    return before - sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())


def compact_lab(target: str | Path) -> list[tuple[Path, int | StoreError]]:
    """compact_run on a run directory, or on every run of a lab: (run directory, bytes
    freed, or the StoreError that kept it as it was: a live writer, a damaged database).
    One run's error does not stop the others."""
    target = Path(target)
    run_dirs = [target] if (target / DB_NAME).is_file() else [run.path for run in find_runs(target)]
    run_dirs = run_dirs or [existing_run(target)]  # an empty lab: 'not a run directory'
    done: list[tuple[Path, int | StoreError]] = []
    for run_dir in run_dirs:
        try:
            done.append((run_dir, compact_run(run_dir)))
        except StoreError as err:
            done.append((run_dir, err))
    return done


def export_run(run: Run, out: str | Path, fmt: str = "csv") -> list[Path]:
    """Write every table of `run` to out/<table>.<fmt> (csv or parquet), plus meta.json and
    results.json; return the paths written."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r}: allowed are {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, frame in run.tables().items():
            path = out / f"{name}.{fmt}"
            if fmt == "csv":
                frame.to_csv(path, index=False, na_rep="NaN")  # "" stays an empty string
            else:
                frame.to_parquet(path, index=False, engine="pyarrow")
            written.append(path)
        for name, doc in (("meta", run.meta()), ("results", run.results())):
            (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
            written.append(out / f"{name}.json")
    except OSError as err:
        raise StoreError(out, f"cannot write the export: {err.strerror}", "pass a writable --out directory") from None
    return written


__all__ = ["DEFAULT_LAB", "EXPORT_FORMATS", "find_runs", "open_run", "list_runs", "lab_token", "read_scalars",
           "compact_run", "compact_lab", "export_run"]
