"""The run store: everything a run records, one SQLite database per run directory.

    lab/                           a directory of runs (DEFAULT_LAB = runs/)
      <run>/  or  <group>/<run>/   a run directory: self-contained, copy it anywhere
        run.db                     SQLite; WAL while a writer has it open, one plain file after
        config.json                the run's config for humans (run.db holds the truth)
        checkpoints/               checkpoint files, indexed (step, path, sha256, size) in run.db
        writer.lock                flock'ed by the live writer, if there is one

The trainer writes through `RunWriter` (buffered; a kill -9 loses at most the unflushed
batch). Readers (the dashboard, the CLI) go through `Run`, `find_runs`, `list_runs`,
`read_scalars` and `export_run`, and never write to the lab. This module is the only
code that knows the schema; it never imports torch. docs/store.md gives the reasons.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import math
import operator
import os
import secrets
import shutil
import socket
import sqlite3
import tempfile
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from stabilitylab import records

DEFAULT_LAB = Path("runs")
DB_NAME = "run.db"
CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_NAME = "writer.lock"
STATUSES = ("running", "finished", "diverged", "failed")
EXPORT_FORMATS = ("csv", "parquet")
LOSS_SCALAR = records.LOSS  # the scalar the summary's final_loss reads
STATE_NORM_SCALAR = records.STATE_NORM  # the scalar the summary's max_state_norm reads (‖h_T‖)

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
SUMMARY_COLUMNS = ("run_id", "path", "readable", "error", "experiment", "sweep_cell", "seed",
                   "status", "status_step", "status_reason", "alive", "last_step", "final_loss",
                   "max_rho", "max_state_norm", "started_at", "git_commit", "token")


class StoreError(Exception):
    """A run store problem a user can fix; the message names the path, the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = ""):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path}: {problem}" + (f". Fix: {fix}" if fix else ""))


class SchemaVersionError(StoreError):
    """run.db was written by a newer stabilitylab (or is not a run store at all)."""


# ---- helpers ---------------------------------------------------------------------------

def _floats(values: Any) -> bytes:
    """A number or 1-D sequence as a little-endian float64 blob."""
    array = np.atleast_1d(np.asarray(values, dtype="<f8"))
    if array.ndim != 1:
        raise ValueError(f"expected a number or a 1-D array, got shape {array.shape}")
    return array.tobytes()


def _array(blob: bytes, dtype: str = "<f8") -> np.ndarray:
    return np.frombuffer(blob, dtype=dtype).astype(dtype[1:])


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _real(column: str) -> str:
    """SQL for a scalar column's value with the NaN blob turned into NULL."""
    return f"IIF(typeof({column}) = 'blob', NULL, {column})"


def _step(step: Any) -> int:
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"steps are ≥ 0, got {step}")
    return step


def _frame(rows: Sequence[tuple], columns: Mapping[str, str]) -> pd.DataFrame:
    """A DataFrame with fixed column dtypes, also when empty; SQL NULL reads as NaN."""
    data = list(zip(*rows)) or [()] * len(columns)
    return pd.DataFrame({name: pd.Series(list(col), dtype=dtype) for (name, dtype), col in zip(columns.items(), data)})


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_version(con: sqlite3.Connection, db: Path) -> None:
    """Raise unless `con` holds a run store this code can read (corrupt, foreign, newer)."""
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.OperationalError:
        raise  # could not open (a read-only directory); the caller decides
    except sqlite3.DatabaseError as err:
        raise StoreError(db, f"unreadable database ({err})",
                         "it is corrupt: restore it from a copy, or move the run out of the lab") from None
    if version == 0:
        raise SchemaVersionError(db, "not a stabilitylab run store (schema version 0)",
                                 "pass a run directory created by RunWriter.create")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(db, f"written with run-store schema v{version}; this stabilitylab reads "
                                     f"up to v{SCHEMA_VERSION}", "upgrade stabilitylab to read this run")


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _run_id_parts(run_id: str) -> list[str]:
    parts = run_id.split("/")
    if len(parts) > 2 or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p for p in parts):
        raise ValueError(f"run id {run_id!r} must be 'name' or 'group/name', with no empty, '.'-leading "
                         "or '..' parts")
    return parts


# ---- writing -----------------------------------------------------------------------------

class RunWriter:
    """Writes one run. Make one with `create`, `resume` or `attach`; use it as a context manager.

    Rows are buffered and written in one transaction every `flush_rows` rows or
    `flush_seconds` seconds (checked when something is logged), and at every event,
    checkpoint, status change and close. A kill -9 loses only the rows logged since the
    last flush; the database itself is never corrupted (WAL, synchronous=NORMAL).
    Logging the same (name, step) twice keeps the last value. Use a writer from the thread
    that made it (one SQLite connection); one writer per run (writer.lock).
    """

    def __init__(self, run_dir: Path, *, owns_status: bool, flush_rows: int, flush_seconds: float):
        """Use `create`, `resume` or `attach`."""
        self.run_dir = run_dir
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._owns_status = owns_status
        self._lock = _lock_writer(run_dir)
        try:
            self._con = sqlite3.connect(run_dir / DB_NAME, isolation_level=None)
            _check_version(self._con, run_dir / DB_NAME)
            if not _journal_mode(self._con, "WAL", patience=10.0):
                raise StoreError(run_dir, "readers kept the run busy for 10 s; could not start writing",
                                 "retry; readers hold a run only for the length of one query")
            self._con.execute("PRAGMA synchronous = NORMAL")  # in WAL: durable against a process crash
        except BaseException:
            os.close(self._lock)
            raise
        self._ids = dict(self._con.execute("SELECT name, id FROM scalar_columns"))
        self._max_columns = self._con.getlimit(sqlite3.SQLITE_LIMIT_COLUMN) - 1  # one is the step
        self.status = self._con.execute("SELECT status FROM status ORDER BY id DESC LIMIT 1").fetchone()[0]
        self._last_step = 0
        self._buffers: dict[str, list[tuple]] = {table: [] for table in INSERTS}
        self._steps: dict[int, dict[int, float | bytes]] = {}  # step -> {column id: value}
        self._new_columns: list[tuple[int, str]] = []
        self._pending = 0
        self._flush_due = time.monotonic() + flush_seconds
        self._closed = False

    # ---- opening ----------------------------------------------------------------------
    @classmethod
    def create(cls, lab: str | Path, run_id: str, config: Mapping[str, Any], *, experiment: str,
               sweep_cell: str | None = None, seed: int | None = None, git_commit: str | None = None,
               torch_version: str | None = None, flush_rows: int = 2000,
               flush_seconds: float = 2.0) -> "RunWriter":
        """Create the run directory lab/run_id (run_id is 'name' or 'group/name') with its
        config, metadata and status 'running', and return its writer. The directory appears
        complete or not at all: it is built under a hidden name and renamed into place."""
        lab = Path(lab)
        _run_id_parts(run_id)
        run_dir = lab / run_id
        if run_dir.exists():
            raise StoreError(run_dir, "a run with this id already exists",
                             "continue it with RunWriter.resume(run_dir, step), or choose a new run id")
        try:
            config_json = json.dumps(dict(config), indent=2)
        except TypeError as err:
            raise StoreError(run_dir, f"config is not JSON-serialisable ({err})",
                             "pass plain dicts of str / int / float / bool / None / lists, "
                             "e.g. dataclasses.asdict(cfg)") from None
        meta = {"run_id": run_id, "experiment": experiment, "sweep_cell": sweep_cell, "seed": seed,
                "git_commit": git_commit, "host": socket.gethostname(),
                "torch_version": torch_version or _installed_version("torch"),
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "config": json.loads(config_json)}
        tmp = run_dir.parent / f".{run_dir.name}.creating-{secrets.token_hex(4)}"
        try:
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            (tmp / CHECKPOINT_DIR).mkdir()
            (tmp / CONFIG_NAME).write_text(config_json + "\n")
            con = sqlite3.connect(tmp / DB_NAME, isolation_level=None)
            try:
                con.executescript(f"BEGIN; {SCHEMA} COMMIT;")
                with _transaction(con):
                    con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
                    con.execute("INSERT INTO status (time, status, step, reason) VALUES (?, 'running', 0, 'created')",
                                (time.time(),))
            finally:
                con.close()
            tmp.rename(run_dir)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(run_dir.parent, f"cannot create run {run_id!r} here: {err.strerror}",
                             f"make {run_dir.parent} writable (chmod u+w {run_dir.parent}) or use another "
                             "lab directory") from None
        return cls(run_dir, owns_status=True, flush_rows=flush_rows, flush_seconds=flush_seconds)

    @classmethod
    def resume(cls, run_dir: str | Path, step: int, *, flush_rows: int = 2000,
               flush_seconds: float = 2.0) -> "RunWriter":
        """Reopen a run to continue training after `step` (the step of the checkpoint it
        resumes from). Rows of every step-indexed table beyond `step` are deleted, so the
        resumed run has no duplicate steps; checkpoint files beyond it stay on disk, out
        of the index. Status becomes 'running'; a 'resume' event records what was dropped."""
        writer = cls(_existing_run(run_dir), owns_status=True, flush_rows=flush_rows,
                     flush_seconds=flush_seconds)
        step = _step(step)
        con = writer._con
        with _transaction(con):
            before = con.total_changes
            for table in STEP_TABLES:
                con.execute(f"DELETE FROM {table} WHERE step > ?", (step,))
            dropped = con.total_changes - before
            con.execute("INSERT INTO status (time, status, step, reason) VALUES (?, 'running', ?, ?)",
                        (time.time(), step, f"resumed after step {step}"))
            con.execute("INSERT INTO events (step, kind, detail, time) VALUES (?, 'resume', ?, ?)",
                        (step, f"resumed after step {step}; dropped {dropped} rows recorded beyond it",
                         time.time()))
        writer.status, writer._last_step = "running", step
        return writer

    @classmethod
    def attach(cls, run_dir: str | Path) -> "RunWriter":
        """Open a run to add analysis, results or events without touching its status or
        truncating anything (what `stabilitylab analyze` uses on a finished run)."""
        writer = cls(_existing_run(run_dir), owns_status=False, flush_rows=2000, flush_seconds=2.0)
        writer._last_step = writer._con.execute("SELECT COALESCE(MAX(step), 0) FROM scalars").fetchone()[0]
        return writer

    # ---- logging ------------------------------------------------------------------------
    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Per-step scalars, any names: {"loss": 2.3, "lr": 1e-3, "grad_norm/core": 0.4}.
        NaN and ±inf are data and are kept. Steps must not go back (resume to rewrite)."""
        self._add_scalars(self._forward_step(step), values)
        self._maybe_flush()

    def log_trace(self, step: int, trace: Mapping[str, Any]) -> None:
        """A loop trace (LoopTrace.to_dict()): each sequence holds one value per loop
        iteration t = 1..T; a plain number (e.g. e_norm_mean) goes to the scalars."""
        step = _step(step)
        self._add_scalars(step, {name: v for name, v in trace.items() if np.ndim(v) == 0})
        for name, value in trace.items():
            if np.ndim(value) != 0:
                self._buffers["traces"].append((str(name), step, _floats(value)))
                self._pending += 1
        self._maybe_flush()

    def log_spectrum(self, step: int, eigenvalues: Any, *, rho: float | None = None,
                     norm_a: float | None = None, norm_b: float | None = None,
                     norm_c: float | None = None, norm_e: float | None = None) -> None:
        """All eigenvalues of Ā (complex or real, 1-D; anything np.asarray takes) with
        ρ(Ā) (default: max |λ|), ‖Ā‖₂, ‖B̄‖₂, ‖C‖₂ and ‖e‖. A missing norm reads as NaN."""
        eig = np.asarray(eigenvalues, dtype=np.complex128)
        if eig.ndim != 1:
            raise ValueError(f"eigenvalues at step {step} must be 1-D, got shape {eig.shape}")
        if rho is None:
            rho = float(np.abs(eig).max()) if eig.size else math.nan
        row = (_step(step), *(None if v is None else float(v) for v in (rho, norm_a, norm_b, norm_c, norm_e)),
               eig.astype("<c16").tobytes())
        self._buffers["spectra"].append(row)
        self._pending += 1
        self._maybe_flush()

    def log_eval(self, step: int, depth: int, metrics: Mapping[str, float]) -> None:
        """Evaluation at test depth `depth`: {"val_loss": 2.1, ...}."""
        step, depth = _step(step), operator.index(depth)
        self._buffers["evals"].extend((step, depth, name, float(v)) for name, v in metrics.items())
        self._pending += len(metrics)
        self._maybe_flush()

    def log_event(self, step: int, kind: str, detail: str = "") -> None:
        """An event (loss_spike, divergence, early_warning, ...); written at once."""
        self._buffers["events"].append((_step(step), str(kind), str(detail), time.time()))
        self.flush()

    def log_analysis(self, name: str, step: int, values: Any) -> None:
        """A numeric analysis result at a step or checkpoint step: a number or a 1-D array
        (Jacobian spectral radius, Lyapunov exponents, ...)."""
        self._buffers["analysis"].append((str(name), _step(step), _floats(values)))
        self._pending += 1
        self._maybe_flush()

    def save_result(self, name: str, value: Any) -> None:
        """A JSON document for the run (a fitted law and its parameters); replaces `name`."""
        self.flush()
        self._con.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                          (str(name), json.dumps(value), time.time()))

    def checkpoint_path(self, step: int) -> Path:
        """Where the trainer writes the checkpoint of `step` (then calls add_checkpoint)."""
        return self.run_dir / CHECKPOINT_DIR / f"step_{_step(step):09d}.safetensors"

    def add_checkpoint(self, step: int, path: str | Path | None = None) -> None:
        """Index a checkpoint file already written under the run directory (default:
        checkpoint_path(step)) with its size and sha256. Several files per step are fine."""
        path = Path(path) if path is not None else self.checkpoint_path(step)
        try:
            relative = path.resolve().relative_to(self.run_dir.resolve())
        except ValueError:
            raise StoreError(path, f"checkpoint is outside the run directory {self.run_dir}",
                             "write it under checkpoints/ (RunWriter.checkpoint_path) so the run stays "
                             "portable") from None
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        self.flush()
        self._con.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                          (_step(step), relative.as_posix(), digest.hexdigest(), size, time.time()))

    def remove_checkpoint(self, step: int) -> None:
        """Drop the checkpoint files of `step` from the index, then from disk (a trainer's
        keep-the-newest-k rule). A crash in between leaves stray files, never an index
        entry without its file."""
        step = _step(step)
        self.flush()
        paths = [p for (p,) in self._con.execute("SELECT path FROM checkpoints WHERE step = ?", (step,))]
        self._con.execute("DELETE FROM checkpoints WHERE step = ?", (step,))
        for path in paths:
            (self.run_dir / path).unlink(missing_ok=True)

    def set_status(self, status: str, step: int | None = None, reason: str = "") -> None:
        """running → finished | diverged | failed, at `step` (default: the last logged
        step), with a reason. Flushes first; a diverged run keeps everything."""
        if status not in STATUSES[1:]:
            raise ValueError(f"status {status!r}: allowed are {', '.join(STATUSES[1:])} "
                             "('running' comes from create or resume)")
        if self.status != "running":
            raise StoreError(self.run_dir, f"the run is already {self.status}",
                             "resume it (RunWriter.resume) before changing its status again")
        self.flush()
        step = self._last_step if step is None else _step(step)
        self._con.execute("INSERT INTO status (time, status, step, reason) VALUES (?, ?, ?, ?)",
                          (time.time(), status, step, str(reason)))
        self.status = status

    # ---- flushing and closing -----------------------------------------------------------
    def flush(self) -> None:
        """Write every buffered row in one transaction (kept buffered if it fails).
        Scalars go in as one upsert per step, grouped by the set of names logged."""
        if self._steps or any(self._buffers.values()):
            groups: dict[tuple[int, ...], list[tuple]] = {}
            for step, row in self._steps.items():
                groups.setdefault(tuple(row), []).append((step, *row.values()))
            with _transaction(self._con):
                for nid, name in self._new_columns:
                    self._con.execute("INSERT INTO scalar_columns VALUES (?, ?)", (nid, name))
                    self._con.execute(f"ALTER TABLE scalars ADD COLUMN v{nid}")
                for ids, rows in groups.items():
                    columns = ", ".join(f"v{i}" for i in ids)
                    updates = ", ".join(f"v{i} = excluded.v{i}" for i in ids)
                    self._con.executemany(f"INSERT INTO scalars (step, {columns}) VALUES (?{', ?' * len(ids)}) "
                                          f"ON CONFLICT (step) DO UPDATE SET {updates}", rows)
                for table, sql in INSERTS.items():
                    self._con.executemany(sql, self._buffers[table])
            self._new_columns.clear()
            self._steps.clear()
            for rows in self._buffers.values():
                rows.clear()
        self._pending = 0
        self._flush_due = time.monotonic() + self.flush_seconds

    def close(self) -> None:
        """Flush, turn the database back into one plain file (when no reader holds it
        open, so a copy of a finished run is just run.db), release the run."""
        if self._closed:
            return
        try:
            self.flush()
            _journal_mode(self._con, "DELETE", patience=1.0)  # if a reader stays, the run stays WAL
            self._con.close()
        finally:
            os.close(self._lock)
            self._closed = True

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A run still 'running' becomes 'finished', or 'failed' when an exception escapes."""
        try:
            if self._owns_status and self.status == "running":
                if exc_type is None:
                    self.set_status("finished")
                else:
                    self.set_status("failed", reason=f"{exc_type.__name__}: {exc}")
        finally:
            self.close()

    # ---- internals --------------------------------------------------------------------
    def _forward_step(self, step: Any) -> int:
        step = _step(step)
        if step < self._last_step:
            raise ValueError(f"step {step} is before the last logged step {self._last_step}; "
                             "steps must not go back (RunWriter.resume truncates a run to rewrite it)")
        self._last_step = step
        return step

    def _add_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Merge values into the buffered row of `step`; a bad value leaves nothing behind."""
        ids, parsed = self._ids, {}
        for name, value in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"scalar {name!r} at step {step}: {value!r} is not a number") from None
            parsed[ids.get(name) or self._intern(name)] = number if number == number else NAN_BLOB
        if parsed:
            self._steps.setdefault(step, {}).update(parsed)
            self._pending += len(parsed)

    def _intern(self, name: str) -> int:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"scalar name {name!r} must be a non-empty string without NUL")
        if len(self._ids) >= self._max_columns:
            raise ValueError(f"scalar {name!r}: a run holds at most {self._max_columns} scalar names "
                             "(SQLite's column limit); log arrays with log_analysis instead")
        nid = self._ids[name] = len(self._ids) + 1
        self._new_columns.append((nid, name))
        return nid

    def _maybe_flush(self) -> None:
        if self._pending >= self.flush_rows or time.monotonic() >= self._flush_due:
            self.flush()


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _existing_run(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / DB_NAME).is_file():
        raise StoreError(run_dir, f"not a run directory (no {DB_NAME})",
                         "pass a directory created by RunWriter.create (`stabilitylab runs` lists them)")
    return run_dir


def _lock_writer(run_dir: Path) -> int:
    """Hold writer.lock (flock) so one process at a time writes a run; the kernel releases
    it when the process dies. Readers test it to tell a live run from a dead one."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise StoreError(run_dir, f"cannot write to this run: {err.strerror}",
                         f"make it writable (chmod -R u+w {run_dir}) or copy it into a writable lab") from None
    deadline = time.monotonic() + 1.0  # a reader's liveness probe holds a shared lock for microseconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise StoreError(run_dir, "another process is writing this run",
                                 "stop that writer first, or write a new run") from None
            time.sleep(0.01)


def _journal_mode(con: sqlite3.Connection, mode: str, patience: float) -> bool:
    """Switch the journal mode (WAL while writing, DELETE when closed). A switch needs
    every reader gone and ignores busy_timeout, so retry for `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            con.execute(f"PRAGMA journal_mode = {mode}")
            return True
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


# ---- reading ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """One per-iteration statistic over training: values[i, t] is loop iteration t + 1 at
    training step steps[i]; NaN beyond that step's depth."""

    steps: np.ndarray  # (S,) int64
    values: np.ndarray  # (S, T_max) float64


class Run:
    """Read-only view of one run directory; every call opens its own short connection
    (so the writer can tidy up when it closes) and never writes to the run."""

    def __init__(self, path: str | Path, run_id: str | None = None):
        self.path = _existing_run(path)
        self.id = run_id or self.path.name
        self.db = self.path / DB_NAME
        self._snapshot: Path | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, run_id={self.id!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickles (st.cache_data) and copies make their own private copy when they need one:
        this one is deleted with its owner."""
        return {**self.__dict__, "_snapshot": None}

    # ---- connecting -------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = self._open()
        try:
            yield con
        finally:
            con.close()

    def _open(self) -> sqlite3.Connection:
        """mode=ro on the run itself when that creates no file: a plain (rollback-journal)
        database, or a WAL one whose -wal and -shm exist (a live or killed writer).
        Otherwise (a copied or read-only WAL run) read a private copy in a temporary dir:
        immutable=1 would skip the rows still in the -wal file."""
        with open(self.db, "rb") as f:
            header = f.read(100)
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
            raise StoreError(self.db, "not an SQLite database (corrupt or truncated)",
                             "restore it from a copy, or move the run out of the lab")
        in_wal = header[18] == 2
        if not in_wal or all(Path(f"{self.db}{s}").exists() for s in ("-wal", "-shm")):
            con = sqlite3.connect(f"{self.db.absolute().as_uri()}?mode=ro", uri=True)
            try:
                _check_version(con, self.db)
                return con
            except sqlite3.OperationalError:
                con.close()  # a read-only directory whose -shm this process cannot map: copy
            except BaseException:
                con.close()
                raise
        con = sqlite3.connect(f"{self._private_copy().as_uri()}?mode=ro", uri=True)
        try:
            _check_version(con, self.db)
        except BaseException:
            con.close()
            raise
        return con

    def _private_copy(self) -> Path:
        if self._snapshot is None:
            tmp = Path(tempfile.mkdtemp(prefix="stabilitylab-run-"))
            weakref.finalize(self, shutil.rmtree, tmp, True)
            shutil.copyfile(self.db, tmp / DB_NAME)
            if Path(f"{self.db}-wal").exists():
                shutil.copyfile(f"{self.db}-wal", tmp / f"{DB_NAME}-wal")
            self._snapshot = tmp / DB_NAME
        return self._snapshot

    # ---- cheap, without SQLite ----------------------------------------------------------
    def token(self) -> tuple[int, ...]:
        """Changes whenever the run commits anything (mtime and size of run.db and its
        -wal); reading never changes it. Key the dashboard's caches on it."""
        out: list[int] = []
        for path in (self.db, Path(f"{self.db}-wal")):
            try:
                st = path.stat()
                out += [st.st_mtime_ns, st.st_size]
            except FileNotFoundError:
                out += [0, 0]
        return tuple(out)

    def alive(self) -> bool:
        """Is a writer process holding this run right now?"""
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # ---- metadata and status ----------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """run_id, experiment, sweep_cell, seed, git_commit, host, torch_version, started_at, config."""
        with self._connect() as con:
            return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}

    def config(self) -> dict[str, Any]:
        return self.meta()["config"]

    def status(self) -> dict[str, Any]:
        """{status, step, reason, time, alive}: the latest status; see status_history."""
        with self._connect() as con:
            row = con.execute("SELECT status, step, reason, time FROM status ORDER BY id DESC LIMIT 1").fetchone()
        return {**dict(zip(("status", "step", "reason", "time"), row)), "alive": self.alive()}

    def status_history(self) -> pd.DataFrame:
        with self._connect() as con:
            rows = con.execute("SELECT time, status, step, reason FROM status ORDER BY id").fetchall()
        return _frame(rows, {"time": "float64", "status": "str", "step": "int64", "reason": "str"})

    def summary(self) -> dict[str, Any]:
        """One row of list_runs: ids, metadata, status, last step, final loss, max ρ(Ā),
        max ‖h_T‖ and every config leaf as config.<dotted.path>."""
        with self._connect() as con:
            meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
            status, step, reason = con.execute(
                "SELECT status, step, reason FROM status ORDER BY id DESC LIMIT 1").fetchone()
            columns = dict(con.execute("SELECT name, id FROM scalar_columns"))
            last_step = con.execute("SELECT MAX(step) FROM scalars").fetchone()[0]
            loss = norm = None
            if LOSS_SCALAR in columns:
                v = f"v{columns[LOSS_SCALAR]}"
                loss = con.execute(f"SELECT {_real(v)} FROM scalars WHERE {v} IS NOT NULL "
                                   "ORDER BY step DESC LIMIT 1").fetchone()[0]
            if STATE_NORM_SCALAR in columns:  # MAX skips NULL: the largest non-NaN value
                v = f"v{columns[STATE_NORM_SCALAR]}"
                norm = con.execute(f"SELECT MAX({_real(v)}) FROM scalars").fetchone()[0]
            max_rho = con.execute("SELECT MAX(rho) FROM spectra").fetchone()[0]
        return {"run_id": self.id, "path": str(self.path), "readable": True, "error": None,
                "experiment": meta.get("experiment"), "sweep_cell": meta.get("sweep_cell"),
                "seed": meta.get("seed"), "status": status, "status_step": step, "status_reason": reason,
                "alive": self.alive(), "last_step": last_step,
                "final_loss": _nan(loss), "max_rho": _nan(max_rho), "max_state_norm": _nan(norm),
                "started_at": meta.get("started_at"), "git_commit": meta.get("git_commit"),
                "token": self.token(), **_flatten(meta.get("config", {}), "config.")}

    # ---- series -----------------------------------------------------------------------
    def scalar_names(self) -> list[str]:
        with self._connect() as con:
            return [n for (n,) in con.execute("SELECT name FROM scalar_columns ORDER BY name")]

    def scalars(self, names: Iterable[str] | None = None, *, start: int | None = None,
                stop: int | None = None, stride: int = 1) -> pd.DataFrame:
        """Long frame (step, name, value), sorted by name then step, for start ≤ step < stop
        and step % stride == 0 (downsampling). A row exists where the name was logged;
        names this run never logged give no rows."""
        steps, labels, values = self._scalar_arrays(names, start, stop, stride)
        return pd.DataFrame({"step": steps, "name": pd.array(labels, dtype="str"), "value": values})

    def _scalar_arrays(self, names: Iterable[str] | None, start: int | None, stop: int | None,
                       stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps int64, names object, values float64) of the long scalar frame."""
        where, params = self._step_filter("step", start, stop, stride)
        steps, labels, values = [np.empty(0, np.int64)], [np.empty(0, object)], [np.empty(0, np.float64)]
        with self._connect() as con:
            columns = dict(con.execute("SELECT name, id FROM scalar_columns"))
            for name in sorted(columns if names is None else set(names) & set(columns)):
                v = f"v{columns[name]}"
                rows = con.execute(f"SELECT step, {_real(v)} FROM scalars WHERE {v} IS NOT NULL AND {where} "
                                   "ORDER BY step", params).fetchall()
                if rows:
                    s, x = zip(*rows)
                    steps.append(np.array(s, dtype=np.int64))
                    values.append(np.array(x, dtype=np.float64))  # None (a NaN) becomes NaN
                    labels.append(np.full(len(rows), name, dtype=object))
        return np.concatenate(steps), np.concatenate(labels), np.concatenate(values)

    def traces(self, names: Iterable[str] | None = None, *, start: int | None = None,
               stop: int | None = None, stride: int = 1) -> dict[str, Trace]:
        """Loop traces by name: state_norm_mean, state_norm_max, delta_norm_mean,
        rel_residual, cosine (whatever the trainer logged), each a Trace."""
        grouped: dict[str, list[tuple[int, np.ndarray]]] = {}
        for name, step, array in self._trace_rows(names, start, stop, stride):
            grouped.setdefault(name, []).append((step, array))
        out = {}
        for name, items in grouped.items():
            values = np.full((len(items), max(len(a) for _, a in items)), np.nan)
            for i, (_, a) in enumerate(items):
                values[i, :len(a)] = a
            out[name] = Trace(np.array([s for s, _ in items], dtype=np.int64), values)
        return out

    def _trace_rows(self, names: Iterable[str] | None, start: int | None, stop: int | None,
                    stride: int) -> list[tuple[str, int, np.ndarray]]:
        where, params = self._step_filter("step", start, stop, stride)
        if names is not None:
            names = list(names)
            where += f" AND name IN ({', '.join('?' * len(names))})"
            params += names
        with self._connect() as con:
            rows = con.execute(f"SELECT name, step, array FROM traces WHERE {where} ORDER BY name, step",
                               params).fetchall()
        return [(name, step, _array(blob)) for name, step, blob in rows]

    def spectra(self, *, start: int | None = None, stop: int | None = None, stride: int = 1) -> pd.DataFrame:
        """(step, rho, norm_a, norm_b, norm_c, norm_e, eigenvalues): ρ(Ā), ‖Ā‖₂, ‖B̄‖₂, ‖C‖₂,
        ‖e‖ and every eigenvalue of Ā as a complex128 array."""
        where, params = self._step_filter("step", start, stop, stride)
        with self._connect() as con:
            rows = con.execute(f"SELECT step, rho, norm_a, norm_b, norm_c, norm_e, eigenvalues FROM spectra "
                               f"WHERE {where} ORDER BY step", params).fetchall()
        rows = [(*r[:6], _array(r[6], "<c16")) for r in rows]
        return _frame(rows, {"step": "int64", **dict.fromkeys(records.SPECTRUM_FIELDS, "float64"), "eigenvalues": "object"})

    def evals(self) -> pd.DataFrame:
        """(step, depth, metric, value): evaluation at several test depths."""
        with self._connect() as con:
            rows = con.execute("SELECT step, depth, metric, value FROM evals ORDER BY step, depth, metric").fetchall()
        return _frame(rows, {"step": "int64", "depth": "int64", "metric": "str", "value": "float64"})

    def events(self) -> pd.DataFrame:
        """(step, kind, detail, time): loss spikes, divergence, early warnings, resumes."""
        with self._connect() as con:
            rows = con.execute("SELECT step, kind, detail, time FROM events ORDER BY step, id").fetchall()
        return _frame(rows, {"step": "int64", "kind": "str", "detail": "str", "time": "float64"})

    def analysis(self, name: str | None = None) -> pd.DataFrame:
        """(name, step, values): numeric analysis results, values a float64 array."""
        sql, params = "SELECT name, step, array FROM analysis", []
        if name is not None:
            sql, params = sql + " WHERE name = ?", [name]
        with self._connect() as con:
            rows = [(n, s, _array(a)) for n, s, a in con.execute(sql + " ORDER BY name, step", params)]
        return _frame(rows, {"name": "str", "step": "int64", "values": "object"})

    def results(self) -> dict[str, Any]:
        """The run's JSON documents (fitted laws), by name."""
        with self._connect() as con:
            return {n: json.loads(v) for n, v in con.execute("SELECT name, value FROM results ORDER BY name")}

    def checkpoints(self) -> pd.DataFrame:
        """(step, path, sha256, size, time); path is absolute, resolved against this run's
        directory wherever it now lives."""
        with self._connect() as con:
            rows = con.execute("SELECT step, path, sha256, size, time FROM checkpoints ORDER BY step, path").fetchall()
        rows = [(s, str(self.path / p), h, n, t) for s, p, h, n, t in rows]
        return _frame(rows, {"step": "int64", "path": "str", "sha256": "str", "size": "int64", "time": "float64"})

    # ---- flat tables (what export writes) -------------------------------------------------
    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the run as a flat frame (arrays exploded to one row per element)."""
        traces = [(step, name, i + 1, v) for name, step, array in self._trace_rows(None, None, None, 1)
                  for i, v in enumerate(array)]
        spectra = self.spectra()
        eig = [(int(s), i, z.real, z.imag) for s, e in zip(spectra["step"], spectra["eigenvalues"])
               for i, z in enumerate(e)]
        analysis = [(n, int(s), i, v) for n, s, vs in self.analysis().itertuples(index=False)
                    for i, v in enumerate(vs)]
        checkpoints = self.checkpoints()
        checkpoints["path"] = [Path(p).relative_to(self.path).as_posix() for p in checkpoints["path"]]
        return {
            "scalars": self.scalars(),
            "traces": _frame(traces, {"step": "int64", "name": "str", "iteration": "int64", "value": "float64"}),
            "spectra": spectra.drop(columns="eigenvalues"),
            "eigenvalues": _frame(eig, {"step": "int64", "index": "int64", "real": "float64", "imag": "float64"}),
            "evals": self.evals(),
            "events": self.events(),
            "analysis": _frame(analysis, {"name": "str", "step": "int64", "index": "int64", "value": "float64"}),
            "checkpoints": checkpoints,
            "status": self.status_history(),
        }

    @staticmethod
    def _step_filter(column: str, start: int | None, stop: int | None, stride: int) -> tuple[str, list]:
        stride = operator.index(stride)
        if stride < 1:
            raise ValueError(f"stride must be ≥ 1, got {stride}")
        lo = -(2 ** 63) if start is None else operator.index(start)
        hi = 2 ** 63 - 1 if stop is None else operator.index(stop)
        return f"{column} >= ? AND {column} < ? AND {column} % ? = 0", [lo, hi, stride]


# ---- labs ------------------------------------------------------------------------------

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


def list_runs(lab: str | Path = DEFAULT_LAB) -> pd.DataFrame:
    """One summary row per run (SUMMARY_COLUMNS, then config.* columns). A run that cannot
    be read is listed with readable=False and the reason in `error`."""
    rows = []
    for run in find_runs(lab):
        try:
            rows.append(run.summary())
        except (StoreError, sqlite3.Error, OSError, ValueError) as err:
            rows.append({"run_id": run.id, "path": str(run.path), "readable": False, "error": str(err),
                         "alive": run.alive(), "token": run.token()})
    config = sorted({k for r in rows for k in r if k.startswith("config.")})
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
    run_dir = _existing_run(run_dir)
    before = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    with RunWriter.attach(run_dir) as writer:
        for step in sorted({int(s) for s in Run(run_dir).checkpoints()["step"]}):
            writer.remove_checkpoint(step)
    with contextlib.closing(sqlite3.connect(run_dir / DB_NAME)) as con:
        con.execute("VACUUM")
    (run_dir / LOCK_NAME).unlink(missing_ok=True)
    checkpoints = run_dir / CHECKPOINT_DIR
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    return before - sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())


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


__all__ = ["DEFAULT_LAB", "DB_NAME", "SCHEMA_VERSION", "STATUSES", "EXPORT_FORMATS", "LOSS_SCALAR",
           "STATE_NORM_SCALAR", "StoreError", "SchemaVersionError", "RunWriter", "Run", "Trace",
           "find_runs", "open_run", "list_runs", "lab_token", "read_scalars", "export_run"]
