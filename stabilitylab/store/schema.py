"""What a run directory holds on disk: file names, the SQL schema and its version, how values
are encoded, and the errors the store raises. The writer and the reader both build on this;
nothing else in the package knows a table or a column.
"""

from __future__ import annotations

import contextlib
import math
import operator
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stabilitylab import records

DB_NAME = "run.db"
CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_NAME = "writer.lock"
STATUSES = ("running", "finished", "diverged", "failed")

# ---- the schema ----------------------------------------------------------------------
# Versioned by PRAGMA user_version. Scalars are wide: one row per step, one column v<id>
# per name (scalar_columns maps names to ids; a new name adds a column). Value columns carry
# no type, so every float stays an 8-byte REAL (-0.0 included). SQLite turns a bound NaN into
# NULL, which a wide row would confuse with "not logged", so a NaN scalar is stored as the
# blob NAN_BLOB; in the other tables a row exists only when logged and NULL reads as NaN.
# Arrays are little-endian blobs: float64 (traces, analysis), complex128 (eigenvalues).
# v2 added `summary`: one row the writer keeps at every flush (last step, final and last
# finite loss, max ρ(Ā), max ‖h_T‖), so listing a lab reads one row per run instead of
# scanning its scalars and spectra. A v1 run reads as before (the summary is computed from
# the tables, `compute_summary`); a writer opening one upgrades it to v2. v1 code refuses
# v2 runs, so no writer can leave a summary stale.
SCHEMA_VERSION = 2
SUMMARY_TABLE = """CREATE TABLE summary (id INTEGER PRIMARY KEY CHECK (id = 1), last_step INTEGER, final_loss,
                      last_finite_loss, max_rho, max_state_norm);  -- v2: one row, kept by the writer"""
SUMMARY_FIELDS = ("last_step", "final_loss", "last_finite_loss", "max_rho", "max_state_norm")
LOSS_SCALAR = records.LOSS  # the scalar the summary's losses read
STATE_NORM_SCALAR = records.STATE_NORM  # the scalar the summary's max_state_norm reads (‖h_T‖)
SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- JSON values
CREATE TABLE status (id INTEGER PRIMARY KEY, time REAL NOT NULL, status TEXT NOT NULL,
                     step INTEGER NOT NULL, reason TEXT NOT NULL);  -- history; the last row holds
CREATE TABLE scalar_columns (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE scalars (step INTEGER PRIMARY KEY);  -- + one column v<id> per scalar_columns row
CREATE TABLE traces (name TEXT NOT NULL, step INTEGER NOT NULL, array BLOB NOT NULL,
                     PRIMARY KEY (name, step)) WITHOUT ROWID;  -- one value per loop iteration
CREATE TABLE spectra (step INTEGER PRIMARY KEY, rho, norm_a, norm_b, norm_c, norm_e,
                      eigenvalues BLOB NOT NULL);
CREATE TABLE evals (step INTEGER NOT NULL, depth INTEGER NOT NULL, metric TEXT NOT NULL, value,
                    PRIMARY KEY (step, depth, metric)) WITHOUT ROWID;
CREATE TABLE events (id INTEGER PRIMARY KEY, step INTEGER NOT NULL, kind TEXT NOT NULL,
                     detail TEXT NOT NULL, time REAL NOT NULL);
CREATE INDEX events_step ON events (step);
CREATE TABLE analysis (name TEXT NOT NULL, step INTEGER NOT NULL, array BLOB NOT NULL,
                       PRIMARY KEY (name, step)) WITHOUT ROWID;
CREATE TABLE results (name TEXT PRIMARY KEY, value TEXT NOT NULL, time REAL NOT NULL);  -- JSON
CREATE TABLE checkpoints (step INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
                          size INTEGER NOT NULL, time REAL NOT NULL, PRIMARY KEY (step, path));
{SUMMARY_TABLE}
PRAGMA user_version = {SCHEMA_VERSION};
"""
STEP_TABLES = ("scalars", "traces", "spectra", "evals", "events", "analysis", "checkpoints")
NAN_BLOB = b"\x00\x00\x00\x00\x00\x00\xf8\x7f"  # a NaN scalar: float64 NaN, little-endian
INSERTS = {  # buffered rows per table (scalars are buffered by step; see RunWriter.flush)
    "traces": "INSERT OR REPLACE INTO traces VALUES (?, ?, ?)",
    "spectra": "INSERT OR REPLACE INTO spectra VALUES (?, ?, ?, ?, ?, ?, ?)",
    "evals": "INSERT OR REPLACE INTO evals VALUES (?, ?, ?, ?)",
    "events": "INSERT INTO events (step, kind, detail, time) VALUES (?, ?, ?, ?)",
    "analysis": "INSERT OR REPLACE INTO analysis VALUES (?, ?, ?)",
}
DAMAGED_FIX = "restore run.db from a copy, or move the run out of the lab"


# ---- errors ----------------------------------------------------------------------------

class StoreError(Exception):
    """A run store problem a user can fix; the message names the path, the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = ""):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path}: {problem}" + (f". Fix: {fix}" if fix else ""))


class SchemaVersionError(StoreError):
    """run.db was written by a newer stabilitylab (or is not a run store at all)."""


class UnreadableRunError(StoreError):
    """run.db cannot be read: not an SQLite file, a damaged page, a failed integrity check.
    Readers raise it and lab-wide operations list the run as unreadable and go on; writers
    raise it instead of writing into the damaged file."""


@contextlib.contextmanager
def reading(db: Path) -> Iterator[None]:
    """Turn SQLite's errors inside the block into UnreadableRunError naming `db` (the store's
    own errors pass through): a busy or I/O error gets a retry fix, anything else is damage."""
    try:
        yield
    except sqlite3.OperationalError as err:
        raise UnreadableRunError(db, f"cannot read the run ({err})",
                                 "retry; if it persists, check the file's permissions and the disk") from None
    except sqlite3.DatabaseError as err:
        raise UnreadableRunError(db, f"damaged database ({err})", DAMAGED_FIX) from None


def check_version(con: sqlite3.Connection, db: Path) -> None:
    """Raise unless `con` holds a run store this code can read (corrupt, foreign, newer)."""
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.OperationalError:
        raise  # could not open (a read-only directory); the caller decides
    except sqlite3.DatabaseError as err:
        raise UnreadableRunError(db, f"unreadable database ({err})", f"it is corrupt: {DAMAGED_FIX}") from None
    if version == 0:
        raise SchemaVersionError(db, "not a stabilitylab run store (schema version 0)",
                                 "pass a run directory created by RunWriter.create")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(db, f"written with run-store schema v{version}; this stabilitylab reads "
                                     f"up to v{SCHEMA_VERSION}", "upgrade stabilitylab to read this run")


def check_integrity(con: sqlite3.Connection, db: Path, doing: str) -> None:
    """PRAGMA quick_check: every page's B-tree structure and record format, O(file size)
    (about 2 ms per MiB here), without comparing indexes to their tables. Raise
    UnreadableRunError unless it says ok; `doing` is what the caller will not do."""
    try:
        rows = con.execute("PRAGMA quick_check").fetchall()
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as err:
        rows = [(str(err),)]
    if rows != [("ok",)]:
        raise UnreadableRunError(db, f"damaged database (integrity check: {rows[0][0]}); {doing}", DAMAGED_FIX)


@contextlib.contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:  # SQLite rolls back by itself after some errors (a full disk)
            con.execute("ROLLBACK")
        raise


# ---- values ----------------------------------------------------------------------------

def floats_blob(values: Any) -> bytes:
    """A number or 1-D sequence as a little-endian float64 blob."""
    array = np.atleast_1d(np.asarray(values, dtype="<f8"))
    if array.ndim != 1:
        raise ValueError(f"expected a number or a 1-D array, got shape {array.shape}")
    return array.tobytes()


def blob_array(blob: bytes, dtype: str = "<f8") -> np.ndarray:
    return np.frombuffer(blob, dtype=dtype).astype(dtype[1:])


def real_sql(column: str) -> str:
    """SQL for a scalar column's value with the NaN blob turned into NULL."""
    return f"IIF(typeof({column}) = 'blob', NULL, {column})"


def finite_sql(column: str) -> str:
    """SQL: the scalar column holds a finite number (not the NaN blob, not ±inf, logged)."""
    return f"(typeof({column}) IN ('real', 'integer') AND abs({column}) < 9e999)"


# ---- the summary (v2) ----------------------------------------------------------------------

def compute_summary(con: sqlite3.Connection) -> dict[str, Any]:
    """The summary from the tables themselves (what a v1 run is read with, and what a
    writer records when it upgrades a run or truncates one on resume): last step, the last
    logged loss (NaN if that was NaN), the last finite loss, max ρ(Ā) and max ‖h_T‖ (NaN
    values skipped). Scans the ‖h_T‖ column and the spectra."""
    columns = dict(con.execute("SELECT name, id FROM scalar_columns"))
    out = dict.fromkeys(SUMMARY_FIELDS)
    out["last_step"] = con.execute("SELECT MAX(step) FROM scalars").fetchone()[0]
    if LOSS_SCALAR in columns:
        out["final_loss"], out["last_finite_loss"] = last_losses(con, f"v{columns[LOSS_SCALAR]}")
    if STATE_NORM_SCALAR in columns:  # MAX skips NULL: the largest non-NaN value
        v = f"v{columns[STATE_NORM_SCALAR]}"
        out["max_state_norm"] = con.execute(f"SELECT MAX({real_sql(v)}) FROM scalars").fetchone()[0]
    out["max_rho"] = con.execute("SELECT MAX(rho) FROM spectra").fetchone()[0]
    return out


def last_losses(con: sqlite3.Connection, v: str) -> tuple[float | None, float | None]:
    """(the last logged loss, NaN as None; the last finite one): index scans from the end."""
    last = con.execute(f"SELECT {real_sql(v)} FROM scalars WHERE {v} IS NOT NULL ORDER BY step DESC LIMIT 1").fetchone()
    finite = con.execute(f"SELECT {v} FROM scalars WHERE {finite_sql(v)} ORDER BY step DESC LIMIT 1").fetchone()
    return (last or (None,))[0], (finite or (None,))[0]


def read_summary(con: sqlite3.Connection) -> dict[str, Any]:
    """The summary row of a v2 run (one row), else compute_summary (a v1 run). The last
    step is read from the scalars table either way, and the spectra's last step looked up:
    two index lookups that also meet a damaged root page of either table, as the scans of
    compute_summary did."""
    if con.execute("PRAGMA user_version").fetchone()[0] >= 2:
        row = con.execute(f"SELECT {', '.join(SUMMARY_FIELDS)} FROM summary").fetchone()
        if row is not None:
            con.execute("SELECT MAX(step) FROM spectra").fetchone()
            last_step = con.execute("SELECT MAX(step) FROM scalars").fetchone()[0]
            return {**dict(zip(SUMMARY_FIELDS, row)), "last_step": last_step}
    return compute_summary(con)


def write_summary(con: sqlite3.Connection, summary: dict[str, Any]) -> None:
    con.execute(f"INSERT OR REPLACE INTO summary (id, {', '.join(SUMMARY_FIELDS)}) "
                f"VALUES (1{', ?' * len(SUMMARY_FIELDS)})", [summary[f] for f in SUMMARY_FIELDS])


def upgrade(con: sqlite3.Connection) -> None:
    """Bring a v1 run to v2 (add the summary table and fill it) in one transaction; a
    writer calls it before its first write."""
    if con.execute("PRAGMA user_version").fetchone()[0] >= 2:
        return
    with transaction(con):
        con.execute(SUMMARY_TABLE)
        write_summary(con, compute_summary(con))
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def check_step(step: Any) -> int:
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"steps are ≥ 0, got {step}")
    return step


def run_id_parts(run_id: str) -> list[str]:
    parts = run_id.split("/")
    if len(parts) > 2 or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p for p in parts):
        raise ValueError(f"run id {run_id!r} must be 'name' or 'group/name', with no empty, '.'-leading "
                         "or '..' parts")
    return parts


def existing_run(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / DB_NAME).is_file():
        raise StoreError(run_dir, f"not a run directory (no {DB_NAME})",
                         "pass a directory created by RunWriter.create (`stabilitylab runs` lists them)")
    return run_dir


__all__ = ["DB_NAME", "CONFIG_NAME", "CHECKPOINT_DIR", "LOCK_NAME", "STATUSES", "SCHEMA_VERSION", "SCHEMA",
           "SUMMARY_FIELDS", "LOSS_SCALAR", "STATE_NORM_SCALAR",
           "STEP_TABLES", "NAN_BLOB", "StoreError", "SchemaVersionError", "UnreadableRunError"]
