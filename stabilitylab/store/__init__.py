"""The run store: everything a run records, one SQLite database per run directory.

    lab/                           a directory of runs (DEFAULT_LAB = runs/)
      <run>/  or  <group>/<run>/   a run directory: self-contained, copy it anywhere
        run.db                     SQLite; WAL while a writer has it open, one plain file after
        config.json                the run's config for humans (run.db holds the truth)
        checkpoints/               checkpoint files, indexed (step, path, sha256, size) in run.db
        writer.lock                flock'ed by the live writer, if there is one

The trainer writes through `RunWriter` (buffered; a kill -9 loses at most the unflushed
batch). Readers (the dashboard, the CLI) go through `Run`, `find_runs`, `list_runs`,
`read_scalars` and `export_run`, and never write to the lab. A read sees one commit; a
damaged database raises UnreadableRunError, never SQLite's own error. This package is the
only code that knows the schema; it imports nothing of stabilitylab but the names list
(records.py), and never torch. docs/store.md gives the reasons and the promise.

    schema.py   the files, the SQL schema and its version, value encodings, the errors
    writer.py   RunWriter: create, resume, attach; the writer lock and the journal mode
    reader.py   Run (one snapshot per read) and Trace
    publish.py  a network filesystem: mount-table detection, atomic snapshots of a node-local writer
    lab.py      a lab's runs: find, list, read scalars across runs, compact, export
"""

from stabilitylab.store.lab import (DEFAULT_LAB, EXPORT_FORMATS, compact_lab, compact_run, export_run, find_runs,
                                    lab_token, list_runs, open_run, read_scalars)
from stabilitylab.store.reader import SUMMARY_COLUMNS, Run, Trace
from stabilitylab.store.schema import (CHECKPOINT_DIR, CONFIG_NAME, DB_NAME, INSERTS, LOCK_NAME, LOSS_SCALAR,
                                       NAN_BLOB, SCHEMA, SCHEMA_VERSION, STATE_NORM_SCALAR, STATUSES, STEP_TABLES,
                                       SUMMARY_FIELDS, SchemaVersionError, StoreError, UnreadableRunError,
                                       run_id_parts)
from stabilitylab.store.writer import RunWriter

__all__ = ["DEFAULT_LAB", "DB_NAME", "CONFIG_NAME", "CHECKPOINT_DIR", "LOCK_NAME", "SCHEMA_VERSION", "SCHEMA",
           "STEP_TABLES", "SUMMARY_FIELDS", "NAN_BLOB", "INSERTS", "STATUSES", "EXPORT_FORMATS", "LOSS_SCALAR",
           "STATE_NORM_SCALAR",
           "SUMMARY_COLUMNS", "StoreError", "SchemaVersionError", "UnreadableRunError", "RunWriter", "Run", "Trace",
           "find_runs", "open_run", "list_runs", "lab_token", "read_scalars", "compact_run", "compact_lab",
           "export_run", "run_id_parts"]
