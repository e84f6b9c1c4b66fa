"""Writing a run: `RunWriter` (create, resume, attach), the writer lock and the journal mode.

The trainer, `stabilitylab analyze` and `events --write` write through it; nothing else
writes to a run. A writer refuses a database that fails its integrity check, so a damaged
run is never written into (docs/store.md, "What a damaged file does").
"""

from __future__ import annotations

import contextlib
import errno
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
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from stabilitylab.store import publish as publishing
from stabilitylab.store.schema import (CHECKPOINT_DIR, CONFIG_NAME, DAMAGED_FIX, DB_NAME, INSERTS, LOCK_NAME,
                                       LOSS_SCALAR, NAN_BLOB, SCHEMA, STATE_NORM_SCALAR, STATUSES, STEP_TABLES,
                                       StoreError, UnreadableRunError, check_integrity, check_step, check_version,
                                       compute_summary, existing_run, floats_blob, last_losses, read_summary,
                                       real_sql, run_id_parts, transaction, upgrade, write_summary)


class RunWriter:
    """Writes one run. Make one with `create`, `resume` or `attach`; use it as a context manager.

    Rows are buffered and written in one transaction every `flush_rows` rows or
    `flush_seconds` seconds (checked when something is logged), and at every event,
    checkpoint, status change and close. A kill -9 loses only the rows logged since the
    last flush; the database itself is never corrupted (WAL, synchronous=NORMAL).
    On a network filesystem (or with STABILITYLAB_STORE_MODE=publish) the writer works on a
    node-local copy and publishes snapshots onto run.db (store/publish.py): every
    `publish_seconds`, at every checkpoint, status change and at close.
    Logging the same (name, step) twice keeps the last value. Use a writer from the thread
    that made it (one SQLite connection); one writer per run (writer.lock).
    """

    def __init__(self, run_dir: Path, *, owns_status: bool, flush_rows: int, flush_seconds: float):
        """Use `create`, `resume` or `attach`."""
        self.run_dir = run_dir
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._owns_status = owns_status
        self._lock = _lock_writer(run_dir)
        self._con = None
        self._local: Path | None = None  # publish mode: the node-local database
        self.publish_seconds = 0.0
        try:
            if publishing.store_mode(run_dir) == "publish":
                self.publish_seconds = publishing.publish_seconds()
                publishing.remove_stale(run_dir)  # a publish a kill interrupted
                self._local = publishing.scratch_copy(run_dir)
                publishing.fetch(run_dir, self._local)  # the published snapshot is the truth (any node)
            self._con = sqlite3.connect(self._local or run_dir / DB_NAME, isolation_level=None)
            check_version(self._con, run_dir / DB_NAME)
            check_integrity(self._con, run_dir / DB_NAME, "refusing to write into it")  # before any write
            if not _journal_mode(self._con, "WAL", patience=10.0):
                raise StoreError(run_dir, "readers kept the run busy for 10 s; could not start writing",
                                 "retry; readers hold a run only for the length of one query")
            self._con.execute("PRAGMA synchronous = NORMAL")  # in WAL: durable against a process crash
            upgrade(self._con)  # a v1 run gets its summary row (schema v2) before anything else is written
            self._summary = read_summary(self._con)
            self._ids = dict(self._con.execute("SELECT name, id FROM scalar_columns"))
            self.status = self._con.execute("SELECT status FROM status ORDER BY id DESC LIMIT 1").fetchone()[0]
        except BaseException as err:
            if self._con is not None:
                self._con.close()
            if self._local is not None:
                shutil.rmtree(self._local.parent, ignore_errors=True)
            os.close(self._lock)
            if isinstance(err, sqlite3.OperationalError):
                raise StoreError(run_dir, f"cannot write to this run ({err})",
                                 f"make it writable (chmod -R u+w {run_dir}) and free disk space, or copy it into "
                                 "a writable lab") from None
            if isinstance(err, sqlite3.DatabaseError):
                raise UnreadableRunError(run_dir / DB_NAME, f"damaged database ({err}); refusing to write into it",
                                         DAMAGED_FIX) from None
            raise
        self._max_columns = self._con.getlimit(sqlite3.SQLITE_LIMIT_COLUMN) - 1  # one is the step
        self._last_step = 0
        self._buffers: dict[str, list[tuple]] = {table: [] for table in INSERTS}
        self._steps: dict[int, dict[int, float | bytes]] = {}  # step -> {column id: value}
        self._new_columns: list[tuple[int, str]] = []
        self._pending = 0
        self._flush_due = time.monotonic() + flush_seconds
        self._publish_due = time.monotonic() + self.publish_seconds
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
        run_id_parts(run_id)
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
            _build_run(tmp, config_json, meta)
            tmp.rename(run_dir)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):  # lost a race: another process created it first
                raise StoreError(run_dir, "another process created a run with this id at the same moment",
                                 "choose a new run id, or continue that run with RunWriter.resume") from None
            raise StoreError(run_dir.parent, f"cannot create run {run_id!r} here: {err.strerror}",
                             f"make {run_dir.parent} writable (chmod u+w {run_dir.parent}) or use another "
                             "lab directory") from None
        except sqlite3.Error as err:  # a full disk, a file system SQLite cannot lock
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(run_dir.parent, f"cannot create run {run_id!r} here ({err})",
                             "free disk space, or use a lab on a local disk") from None
        return cls(run_dir, owns_status=True, flush_rows=flush_rows, flush_seconds=flush_seconds)

    @classmethod
    def resume(cls, run_dir: str | Path, step: int, *, flush_rows: int = 2000,
               flush_seconds: float = 2.0) -> "RunWriter":
        """Reopen a run to continue training after `step` (the step of the checkpoint it
        resumes from). Rows of every step-indexed table beyond `step` are deleted, so the
        resumed run has no duplicate steps; checkpoint files beyond it stay on disk, out
        of the index. Status becomes 'running'; a 'resume' event records what was dropped."""
        writer = cls(existing_run(run_dir), owns_status=True, flush_rows=flush_rows,
                     flush_seconds=flush_seconds)
        con = writer._con
        try:
            step = check_step(step)
            with writer._writing(), transaction(con):
                before = con.total_changes
                for table in STEP_TABLES:
                    con.execute(f"DELETE FROM {table} WHERE step > ?", (step,))
                dropped = con.total_changes - before
                writer._summary = compute_summary(con)  # the maxima may have been in the dropped rows
                write_summary(con, writer._summary)
                con.execute("INSERT INTO status (time, status, step, reason) VALUES (?, 'running', ?, ?)",
                            (time.time(), step, f"resumed after step {step}"))
                con.execute("INSERT INTO events (step, kind, detail, time) VALUES (?, 'resume', ?, ?)",
                            (step, f"resumed after step {step}; dropped {dropped} rows recorded beyond it",
                             time.time()))
            writer._publish()
        except BaseException:
            writer.close()  # release the run: nothing was changed
            raise
        writer.status, writer._last_step = "running", step
        return writer

    @classmethod
    def attach(cls, run_dir: str | Path) -> "RunWriter":
        """Open a run to add analysis, results or events without touching its status or
        truncating anything (what `stabilitylab analyze` uses on a finished run)."""
        writer = cls(existing_run(run_dir), owns_status=False, flush_rows=2000, flush_seconds=2.0)
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
        step = check_step(step)
        self._add_scalars(step, {name: v for name, v in trace.items() if np.ndim(v) == 0})
        for name, value in trace.items():
            if np.ndim(value) != 0:
                self._buffers["traces"].append((str(name), step, floats_blob(value)))
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
        row = (check_step(step), *(None if v is None else float(v) for v in (rho, norm_a, norm_b, norm_c, norm_e)),
               eig.astype("<c16").tobytes())
        self._buffers["spectra"].append(row)
        self._pending += 1
        self._maybe_flush()

    def log_eval(self, step: int, depth: int, metrics: Mapping[str, float]) -> None:
        """Evaluation at test depth `depth`: {"val_loss": 2.1, ...}."""
        step, depth = check_step(step), operator.index(depth)
        self._buffers["evals"].extend((step, depth, name, float(v)) for name, v in metrics.items())
        self._pending += len(metrics)
        self._maybe_flush()

    def log_event(self, step: int, kind: str, detail: str = "") -> None:
        """An event (loss_spike, divergence, early_warning, ...); written at once."""
        self._buffers["events"].append((check_step(step), str(kind), str(detail), time.time()))
        self.flush()

    def log_analysis(self, name: str, step: int, values: Any) -> None:
        """A numeric analysis result at a step or checkpoint step: a number or a 1-D array
        (Jacobian spectral radius, Lyapunov exponents, ...)."""
        self._buffers["analysis"].append((str(name), check_step(step), floats_blob(values)))
        self._pending += 1
        self._maybe_flush()

    def save_result(self, name: str, value: Any) -> None:
        """A JSON document for the run (a fitted law and its parameters); replaces `name`."""
        self.flush()
        with self._writing():
            self._con.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                              (str(name), json.dumps(value), time.time()))

    def checkpoint_path(self, step: int) -> Path:
        """Where the trainer writes the checkpoint of `step` (then calls add_checkpoint)."""
        return self.run_dir / CHECKPOINT_DIR / f"step_{check_step(step):09d}.safetensors"

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
        with self._writing():
            self._con.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
                              (check_step(step), relative.as_posix(), digest.hexdigest(), size, time.time()))
        self._publish()  # a resume reads the index from the published snapshot

    def remove_checkpoint(self, step: int) -> None:
        """Drop the checkpoint files of `step` from the index, then from disk (a trainer's
        keep-the-newest-k rule). A crash in between leaves stray files, never an index
        entry without its file."""
        step = check_step(step)
        self.flush()
        with self._writing():
            paths = [p for (p,) in self._con.execute("SELECT path FROM checkpoints WHERE step = ?", (step,))]
            self._con.execute("DELETE FROM checkpoints WHERE step = ?", (step,))
        self._publish()  # the lab's index drops the files before they go
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
        step = self._last_step if step is None else check_step(step)
        with self._writing():
            self._con.execute("INSERT INTO status (time, status, step, reason) VALUES (?, ?, ?, ?)",
                              (time.time(), status, step, str(reason)))
        self.status = status
        self._publish()

    # ---- flushing and closing -----------------------------------------------------------
    def flush(self) -> None:
        """Write every buffered row in one transaction (kept buffered if it fails).
        Scalars go in as one upsert per step, grouped by the set of names logged."""
        if self._steps or any(self._buffers.values()):
            groups: dict[tuple[int, ...], list[tuple]] = {}
            for step, row in self._steps.items():
                groups.setdefault(tuple(row), []).append((step, *row.values()))
            with self._writing(), transaction(self._con):
                overwritten = self._overwritten()
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
                summary = self._next_summary(overwritten)
                write_summary(self._con, summary)
            self._summary = summary  # only once committed: a failed flush must not count its rows
            self._new_columns.clear()
            self._steps.clear()
            for rows in self._buffers.values():
                rows.clear()
        self._pending = 0
        self._flush_due = time.monotonic() + self.flush_seconds
        if self._local is not None and time.monotonic() >= self._publish_due:
            self._publish()

    def _overwritten(self) -> set[str]:
        """The maxima this flush may lower by replacing a logged value (the same step logged
        again): an index lookup each, before the rows go in."""
        out = set()
        norm = self._ids.get(STATE_NORM_SCALAR)
        norm_steps = [step for step, row in self._steps.items() if norm in row]
        if norm_steps and norm not in dict(self._new_columns) and self._con.execute(
                f"SELECT 1 FROM scalars WHERE step >= ? AND v{norm} IS NOT NULL LIMIT 1",
                (min(norm_steps),)).fetchone():
            out.add("max_state_norm")
        spectra = [r[0] for r in self._buffers["spectra"]]
        if spectra and (len(set(spectra)) < len(spectra)  # a step logged twice in this flush: the last one stays
                        or self._con.execute("SELECT 1 FROM spectra WHERE step >= ? LIMIT 1",
                                             (min(spectra),)).fetchone()):
            out.add("max_rho")
        return out

    def _next_summary(self, overwritten: set[str]) -> dict[str, Any]:
        """The summary row with this flush's rows in (inside its transaction, after them):
        max ‖h_T‖ and max ρ(Ā) from the new values (NaN skipped, as SQL's MAX skips NULL),
        or from the whole column where a value was replaced; the last step and the last
        (finite) loss by index lookups from the end. The numbers of compute_summary, without
        its scans."""
        summary = dict(self._summary)
        norm = self._ids.get(STATE_NORM_SCALAR)
        # a NaN is buffered as NAN_BLOB, never as a float
        new_norms = [v for row in self._steps.values() if isinstance(v := row.get(norm), float)]
        new_rhos = [r[1] for r in self._buffers["spectra"] if r[1] is not None and r[1] == r[1]]
        for key, new in (("max_state_norm", new_norms), ("max_rho", new_rhos)):
            summary[key] = max([*new, *([] if summary[key] is None else [summary[key]])], default=None)
        if "max_state_norm" in overwritten:
            column = real_sql(f"v{norm}")
            summary["max_state_norm"] = self._con.execute(f"SELECT MAX({column}) FROM scalars").fetchone()[0]
        if "max_rho" in overwritten:
            summary["max_rho"] = self._con.execute("SELECT MAX(rho) FROM spectra").fetchone()[0]
        if self._steps:
            summary["last_step"] = self._con.execute("SELECT MAX(step) FROM scalars").fetchone()[0]
            if LOSS_SCALAR in self._ids:
                summary["final_loss"], summary["last_finite_loss"] = last_losses(self._con,
                                                                                 f"v{self._ids[LOSS_SCALAR]}")
        return summary

    def _publish(self) -> None:
        """Publish mode: replace the lab's run.db by a snapshot of the local database."""
        if self._local is None:
            return
        try:
            publishing.publish(self._con, self.run_dir)
        except (OSError, sqlite3.Error) as err:
            raise StoreError(self.run_dir, f"cannot publish a snapshot to the lab ({err}); the run continues in "
                                           f"{self._local}",
                             "free disk space on the lab, then continue the run with --resume") from None
        self._publish_due = time.monotonic() + self.publish_seconds

    def close(self) -> None:
        """Flush, turn the database back into one plain file (when no reader holds it
        open, so a copy of a finished run is just run.db), release the run."""
        if self._closed:
            return
        published = False
        try:
            self.flush()
            if self._local is not None:
                self._publish()
                published = True
            else:
                with contextlib.suppress(sqlite3.OperationalError):  # a full disk: WAL stays, readers handle it
                    _journal_mode(self._con, "DELETE", patience=1.0)  # if a reader stays, the run stays WAL
        finally:
            self._con.close()
            if published:  # else keep the local database: it may hold more than the lab
                shutil.rmtree(self._local.parent, ignore_errors=True)
            os.close(self._lock)
            self._closed = True

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A run still 'running' becomes 'finished', or 'failed' when an exception escapes."""
        try:
            if self._owns_status and self.status == "running":
                if exc_type is not None:
                    self._set_failed(f"{exc_type.__name__}: {exc}")
                else:
                    try:
                        self.set_status("finished")
                    except StoreError as err:  # the last rows could not be written (a full disk)
                        self._set_failed(f"StoreError: {err}")
                        raise
        finally:
            self.close()

    def _set_failed(self, reason: str) -> None:
        """Status 'failed' with `reason`. If the buffered rows cannot be written (a full disk),
        drop them and record the status alone (after a checkpoint empties the -wal file):
        every row committed before stays."""
        try:
            self.set_status("failed", reason=reason)
        except StoreError:
            if self.status != "running":
                raise  # written locally, only the publish failed: close keeps the scratch copy and says where
            lost = self._discard()
            with contextlib.suppress(sqlite3.Error):  # move the -wal into run.db and start it over
                self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.set_status("failed", reason=f"{reason}; {lost} values logged since the last commit were not "
                                             "written")

    def _discard(self) -> int:
        """Forget every buffered row (and the scalar names only they used); return how many values."""
        lost = sum(len(row) for row in self._steps.values()) + sum(len(rows) for rows in self._buffers.values())
        for _, name in self._new_columns:
            del self._ids[name]
        self._new_columns.clear()
        self._steps.clear()
        for rows in self._buffers.values():
            rows.clear()
        return lost

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """SQLite's errors while writing as StoreErrors naming the run: a full disk or an I/O
        error keeps what was committed (resume later); damage stops the writer."""
        try:
            yield
        except sqlite3.OperationalError as err:
            raise StoreError(self.run_dir, f"cannot write ({err})",
                             "free disk space (or repair the disk), then continue the run with --resume; "
                             "everything committed before is kept") from None
        except sqlite3.DatabaseError as err:
            raise UnreadableRunError(self.run_dir / DB_NAME, f"damaged database ({err}); stopped writing",
                                     DAMAGED_FIX) from None

    # ---- internals --------------------------------------------------------------------
    def _forward_step(self, step: Any) -> int:
        step = check_step(step)
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


def _build_run(tmp: Path, config_json: str, meta: Mapping[str, Any]) -> None:
    """Fill the hidden directory `tmp` that create renames into place."""
    (tmp / CHECKPOINT_DIR).mkdir()
    (tmp / CONFIG_NAME).write_text(config_json + "\n")
    con = sqlite3.connect(tmp / DB_NAME, isolation_level=None)
    try:
        con.executescript(f"BEGIN; {SCHEMA} COMMIT;")
        with transaction(con):
            con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
            con.execute("INSERT INTO status (time, status, step, reason) VALUES (?, 'running', 0, 'created')",
                        (time.time(),))
    finally:
        con.close()


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
        except sqlite3.OperationalError as err:
            if err.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise  # not a reader in the way: a full disk, an I/O error, a read-only file
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


__all__ = ["RunWriter"]
