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
SCHEMA_VERSION = 1
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
           "STEP_TABLES", "NAN_BLOB", "StoreError", "SchemaVersionError", "UnreadableRunError"]
