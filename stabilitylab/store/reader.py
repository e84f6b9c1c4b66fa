"""Reading a run: `Run`, a read-only view of one run directory, and `Trace`.

Every read happens in one read transaction: a reader sees one commit of the writer, never
a mix of two (a live run commits every flush). A method's reads share one snapshot; to
share one across several calls, read inside `with run.snapshot():`. SQLite's errors come
out as UnreadableRunError naming the run. Nothing here writes to a lab.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import operator
import os
import shutil
import sqlite3
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from stabilitylab import records
from stabilitylab.store.schema import (DAMAGED_FIX, DB_NAME, LOCK_NAME,
                                       UnreadableRunError, blob_array, check_integrity, check_version, existing_run,
                                       nan_if_none, read_summary, reading, real_sql)

SUMMARY_COLUMNS = ("run_id", "path", "readable", "error", "experiment", "sweep_cell", "seed",
                   "status", "status_step", "status_reason", "alive", "last_step", "final_loss",
                   "last_finite_loss", "max_rho", "max_state_norm", "started_at", "git_commit", "token")
SELECT_NAMES = 400  # scalar names per wide SELECT (two result columns each; SQLite allows 2000)


def _frame(rows: Sequence[tuple], columns: Mapping[str, str]) -> pd.DataFrame:
    """A DataFrame with fixed column dtypes, also when empty; SQL NULL reads as NaN."""
    data = list(zip(*rows)) or [()] * len(columns)
    return pd.DataFrame({name: pd.Series(list(col), dtype=dtype) for (name, dtype), col in zip(columns.items(), data)})




@dataclass(frozen=True)
class Trace:
    """One per-iteration statistic over training: values[i, t] is loop iteration t + 1 at
    training step steps[i]; NaN beyond that step's depth."""

    steps: np.ndarray  # (S,) int64
    values: np.ndarray  # (S, T_max) float64


class Run:
    """Read-only view of one run directory; every call opens its own short connection
    (so the writer can tidy up when it closes), reads in one transaction and never writes
    to the run."""

    def __init__(self, path: str | Path, run_id: str | None = None):
        self.path = existing_run(path)
        self.id = run_id or self.path.name
        self.db = self.path / DB_NAME
        self._copy: tuple[Path, tuple[int, ...], weakref.finalize] | None = None  # (copy, its token(), its removal)
        self._held: dict[int, sqlite3.Connection] = {}  # thread id -> the connection of its snapshot()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, run_id={self.id!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickles (st.cache_data) and copies make their own private copy when they need one:
        this one is deleted with its owner."""
        return {**self.__dict__, "_copy": None, "_held": {}}

    # ---- connecting -------------------------------------------------------------------
    @contextlib.contextmanager
    def snapshot(self) -> Iterator["Run"]:
        """Read several things from one commit: every read of this Run inside the block (in
        this thread) shares one read transaction. Keep the block short: it holds the run
        open, which in rollback-journal mode makes a writer's commit wait, and in WAL mode
        keeps the writer from tidying its -wal file at close.

            with run.snapshot():
                meta, status, results = run.meta(), run.status_history(), run.results()
        """
        thread = threading.get_ident()
        if thread in self._held:
            yield self
            return
        with self._connect() as con:
            self._held[thread] = con
            try:
                yield self
            finally:
                del self._held[thread]

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in an open read transaction (the snapshot's, inside snapshot());
        SQLite's errors become UnreadableRunError."""
        with reading(self.db):
            held = self._held.get(threading.get_ident())
            if held is not None:
                yield held
                return
            con = self._open()
            try:
                con.execute("BEGIN")  # deferred: the first SELECT fixes the commit every later one sees
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
            raise UnreadableRunError(self.db, "not an SQLite database (corrupt or truncated)", DAMAGED_FIX)
        in_wal = header[18] == 2
        if not in_wal or all(Path(f"{self.db}{s}").exists() for s in ("-wal", "-shm")):
            con = sqlite3.connect(f"{self.db.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)
            try:
                check_version(con, self.db)
                return con
            except sqlite3.OperationalError:
                con.close()  # a read-only directory whose -shm this process cannot map: copy
            except BaseException:
                con.close()
                raise
        con = sqlite3.connect(f"{self._private_copy().as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            check_version(con, self.db)
        except BaseException:
            con.close()
            raise
        return con

    def _private_copy(self) -> Path:
        """A copy of run.db and its -wal, taken again whenever the run committed since the
        last one (token() changed): a read sees every commit made before it began. A live
        writer's first moments need it too (run.db already says WAL, its -wal is not there
        yet), and a stale copy kept from then would hide every later commit."""
        token = self.token()  # before copying: a commit during the copy makes the next read copy again
        if self._copy is None or self._copy[1] != token:
            if self._copy is not None:
                self._copy[2]()  # remove the stale copy now, not when this Run goes
            tmp = Path(tempfile.mkdtemp(prefix="stabilitylab-run-"))
            remove = weakref.finalize(self, shutil.rmtree, tmp, True)
            shutil.copyfile(self.db, tmp / DB_NAME)
            if Path(f"{self.db}-wal").exists():
                shutil.copyfile(f"{self.db}-wal", tmp / f"{DB_NAME}-wal")
            self._copy = tmp / DB_NAME, token, remove
        return self._copy[0]

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

    def check(self) -> None:
        """PRAGMA quick_check of run.db: every page's structure, about 2 ms per MiB here. Raises
        UnreadableRunError where a page is damaged, even one no summary would touch."""
        with self._connect() as con:
            check_integrity(con, self.db, "its records cannot be trusted")

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
        """One row of list_runs: ids, metadata, status, last step, final loss (the last one
        logged, NaN if it was NaN), the last finite loss, max ρ(Ā), max ‖h_T‖ and every
        config leaf as config.<dotted.path>. A v2 run reads the summary row its writer
        keeps; a v1 run computes it from the tables (store/schema.py: read_summary)."""
        with self._connect() as con:
            meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
            status, step, reason = con.execute(
                "SELECT status, step, reason FROM status ORDER BY id DESC LIMIT 1").fetchone()
            numbers = read_summary(con)
        return {"run_id": self.id, "path": str(self.path), "readable": True, "error": None,
                "experiment": meta.get("experiment"), "sweep_cell": meta.get("sweep_cell"),
                "seed": meta.get("seed"), "status": status, "status_step": step, "status_reason": reason,
                "alive": self.alive(), "last_step": numbers["last_step"],
                **{k: nan_if_none(numbers[k]) for k in ("final_loss", "last_finite_loss", "max_rho",
                                                        "max_state_norm")},
                "started_at": meta.get("started_at"), "git_commit": meta.get("git_commit"),
                "token": self.token(), **records.dotted(meta.get("config", {}), records.CONFIG_PREFIX)}

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

    def scalar_series(self, names: Iterable[str] | None = None, *, start: int | None = None,
                      stop: int | None = None, stride: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (steps int64, values float64) where the name was logged (NaN where NaN
        was logged), for start ≤ step < stop and step % stride == 0; names this run never
        logged are absent. Columnar: one wide SELECT of the wanted columns (per 400 names),
        not one query and one long frame per name. Each name keeps its own steps: names
        logged at different rates (every step, every 10th) would otherwise leave gaps."""
        where, params = self._step_filter("step", start, stop, stride)
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        with self._connect() as con:
            columns = dict(con.execute("SELECT name, id FROM scalar_columns"))
            wanted = sorted(columns if names is None else set(names) & set(columns))
            for i in range(0, len(wanted), SELECT_NAMES):
                chunk = [f"v{columns[n]}" for n in wanted[i:i + SELECT_NAMES]]
                select = ", ".join(f"{real_sql(v)}, {v} IS NOT NULL" for v in chunk)
                logged = " OR ".join(f"{v} IS NOT NULL" for v in chunk)
                rows = con.execute(f"SELECT step, {select} FROM scalars WHERE ({logged}) AND {where} ORDER BY step",
                                   params).fetchall()
                table = np.array(rows, dtype=np.float64).reshape(len(rows), 1 + 2 * len(chunk))  # None → NaN
                steps = np.array([r[0] for r in rows], dtype=np.int64)  # exact beyond 2**53
                for j, name in enumerate(wanted[i:i + SELECT_NAMES]):
                    mask = table[:, 2 + 2 * j] == 1
                    if mask.any():
                        out[name] = steps[mask], table[mask, 1 + 2 * j]
        return out

    def _scalar_arrays(self, names: Iterable[str] | None, start: int | None, stop: int | None,
                       stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps int64, names object, values float64) of the long scalar frame: scalar_series laid end to end."""
        series = self.scalar_series(names, start=start, stop=stop, stride=stride)
        steps = [np.empty(0, np.int64), *(s for s, _ in series.values())]
        values = [np.empty(0, np.float64), *(v for _, v in series.values())]
        labels = [np.empty(0, object), *(np.full(len(s), n, dtype=object) for n, (s, _) in series.items())]
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
        return [(name, step, blob_array(blob)) for name, step, blob in rows]

    def spectra(self, *, start: int | None = None, stop: int | None = None, stride: int = 1,
                eigenvalues: bool = True) -> pd.DataFrame:
        """(step, rho, norm_a, norm_b, norm_c, norm_e, eigenvalues): ρ(Ā), ‖Ā‖₂, ‖B̄‖₂, ‖C‖₂,
        ‖e‖ and every eigenvalue of Ā as a complex128 array. eigenvalues=False leaves that
        column out and never reads the blobs (curves over training: ~5x faster)."""
        where, params = self._step_filter("step", start, stop, stride)
        fields = ", ".join(records.SPECTRUM_FIELDS)
        with self._connect() as con:
            rows = con.execute(f"SELECT step, {fields}{', eigenvalues' if eigenvalues else ''} FROM spectra "
                               f"WHERE {where} ORDER BY step", params).fetchall()
        columns = {"step": "int64", **dict.fromkeys(records.SPECTRUM_FIELDS, "float64")}
        if not eigenvalues:
            return _frame(rows, columns)
        rows = [(*r[:-1], blob_array(r[-1], "<c16")) for r in rows]
        return _frame(rows, {**columns, "eigenvalues": "object"})

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
            rows = [(n, s, blob_array(a)) for n, s, a in con.execute(sql + " ORDER BY name, step", params)]
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
        """Every table of the run as a flat frame (arrays exploded to one row per element),
        all read from one commit."""
        with self.snapshot():
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


__all__ = ["Run", "Trace", "SUMMARY_COLUMNS"]
