"""The run store: crash safety, live reading, portability, schema versions, export, resume."""

import ast
import gc
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stabilitylab import store
from stabilitylab.store import Run, RunWriter, SchemaVersionError, StoreError

REPO = Path(__file__).resolve().parents[1]
# Subprocesses load the store with torch made unimportable and the package __init__ (which
# imports the model, hence torch) bypassed: the store must work without torch.
PREAMBLE = f"""
import sys, types
sys.modules["torch"] = None
package = types.ModuleType("stabilitylab"); package.__path__ = [{str(REPO / "stabilitylab")!r}]
sys.modules["stabilitylab"] = package
from stabilitylab.store import Run, RunWriter, StoreError, list_runs
"""


def python(code: str, *args: str, obey_permissions: bool = False) -> subprocess.CompletedProcess:
    """Run PREAMBLE + code in a fresh interpreter. With `obey_permissions`, root runs it without
    the capabilities that override file modes, so chmod binds it as it binds everyone else."""
    command = [sys.executable, "-c", PREAMBLE + code, *args]
    if obey_permissions and os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv (util-linux): chmod cannot bind this test")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture
def read_only():
    """make(path): chmod a tree read-only (dirs 555, files 444); write access is restored after the test."""
    made: list[Path] = []

    def make(root: Path) -> None:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        made.append(root)

    yield make
    for root in made:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def write_run(lab: Path, run_id: str = "r", steps: int = 30, *, finish: bool = True, **create) -> Path:
    """A small run with every kind of record."""
    create = {"experiment": "test", "seed": 0, **create}
    with RunWriter.create(lab, run_id, {"model": {"injection": "parcae", "mean_recurrence": 4},
                                        "train": {"lr": 1e-3}}, **create) as w:
        for step in range(1, steps + 1):
            w.log(step, {"loss": 4.0 / step, "lr": 1e-3, "h_T_norm": float(step)})
            if step % 10 == 0:
                w.log_trace(step, {"state_norm_mean": [1.0, 2.0, float(step)], "cosine": [0.5, math.nan],
                                   "e_norm_mean": 3.0})
                w.log_spectrum(step, [0.5 + 0.1j, 0.5 - 0.1j, -0.25], norm_a=0.6, norm_b=1.0, norm_e=2.0)
                w.log_eval(step, 2, {"val_loss": 5.0 / step})
                w.log_eval(step, 8, {"val_loss": 4.5 / step})
        w.log_event(steps, "spike", "loss ×3")
        w.checkpoint_path(steps).write_bytes(b"weights")
        w.add_checkpoint(steps)
        w.log_analysis("lyapunov", steps, [-0.1, -0.7])
        w.save_result("depth_law", {"L_inf": 2.0, "Z": 1.5})
        if not finish:
            w.set_status("diverged", steps, "loss is NaN")
    return lab / run_id


def files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- round trips ---------------------------------------------------------------------

finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
names = st.text(min_size=1, max_size=12).filter(lambda s: "\x00" not in s)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.dictionaries(st.integers(0, 2 ** 62), st.dictionaries(names, finite_or_not, max_size=5), max_size=8))
def test_scalar_rows_round_trip_bit_for_bit_including_nan_inf_and_negative_zero(tmp_path_factory, rows):
    lab = tmp_path_factory.mktemp("lab")
    with RunWriter.create(lab, "r", {}, experiment="prop", flush_rows=3) as w:
        for step in sorted(rows):
            w.log(step, rows[step])
    got = Run(lab / "r").scalars()
    expected = sorted((name, step, value) for step, values in rows.items() for name, value in values.items())
    assert len(got) == len(expected)
    for (name, step, value), (gname, gstep, gvalue) in zip(expected, zip(got["name"], got["step"], got["value"])):
        assert (gname, int(gstep)) == (name, step)
        assert math.isnan(value) if math.isnan(gvalue) else struct.pack("<d", gvalue) == struct.pack("<d", value)


def test_every_kind_of_record_reads_back(tmp_path):
    run = Run(write_run(tmp_path, "exp/a"))
    assert run.meta()["experiment"] == "test" and run.config()["train"]["lr"] == 1e-3
    assert json.loads((run.path / "config.json").read_text()) == run.config()
    assert run.scalar_names() == ["e_norm_mean", "h_T_norm", "loss", "lr"]  # e_norm_mean came with the trace
    traces = run.traces()
    assert list(traces["state_norm_mean"].steps) == [10, 20, 30]
    np.testing.assert_array_equal(traces["state_norm_mean"].values[-1], [1.0, 2.0, 30.0])
    assert traces["cosine"].values.shape == (3, 2) and np.isnan(traces["cosine"].values[:, 1]).all()
    spectra = run.spectra()
    assert list(spectra["step"]) == [10, 20, 30]
    assert spectra["rho"].iloc[0] == pytest.approx(abs(0.5 + 0.1j))  # defaults to max |λ|
    assert np.isnan(spectra["norm_c"]).all()  # not given
    np.testing.assert_array_equal(spectra["eigenvalues"].iloc[0], [0.5 + 0.1j, 0.5 - 0.1j, -0.25])
    evals = run.evals()
    assert set(evals["depth"]) == {2, 8} and evals.query("step == 30 and depth == 8")["value"].item() == 0.15
    assert run.events()[["step", "kind", "detail"]].values.tolist() == [[30, "spike", "loss ×3"]]
    np.testing.assert_array_equal(run.analysis("lyapunov")["values"].iloc[0], [-0.1, -0.7])
    assert run.results() == {"depth_law": {"L_inf": 2.0, "Z": 1.5}}
    ckpt = run.checkpoints().iloc[0]
    assert Path(ckpt["path"]).read_bytes() == b"weights" and ckpt["size"] == 7
    assert ckpt["sha256"] == hashlib.sha256(b"weights").hexdigest()
    status = run.status()
    assert (status["status"], status["step"], status["alive"]) == ("finished", 30, False)


def test_export_to_csv_and_parquet_round_trips_every_table(tmp_path):
    run = Run(write_run(tmp_path / "lab"))
    with RunWriter.attach(run.path) as w:  # awkward values must survive the export too
        w.log(31, {"loss": math.nan, "lr": -0.0, "h_T_norm": math.inf})
    tables = run.tables()
    for fmt in store.EXPORT_FORMATS:
        written = store.export_run(run, tmp_path / fmt, fmt)
        assert {p.name for p in written} >= {f"{name}.{fmt}" for name in tables} | {"meta.json", "results.json"}
        for name, expected in tables.items():
            path = tmp_path / fmt / f"{name}.{fmt}"
            got = pd.read_csv(path, keep_default_na=False, na_values=["NaN"]) if fmt == "csv" else pd.read_parquet(path)
            pd.testing.assert_frame_equal(got, expected, check_dtype=False, obj=f"{fmt} {name}")
        assert json.loads((tmp_path / fmt / "results.json").read_text()) == run.results()
    scalars = pd.read_parquet(tmp_path / "parquet" / "scalars.parquet").query("step == 31").set_index("name")["value"]
    assert math.isnan(scalars["loss"]) and scalars["h_T_norm"] == math.inf and math.copysign(1, scalars["lr"]) == -1


# ---- writer rules ----------------------------------------------------------------------

def test_resume_truncates_rows_beyond_the_resumed_step_so_no_step_repeats(tmp_path):
    path = write_run(tmp_path, steps=30, finish=False)
    with RunWriter.resume(path, 20) as w:
        for step in range(21, 26):
            w.log(step, {"loss": 100.0 + step})
    run = Run(path)
    loss = run.scalars(["loss"])
    assert list(loss["step"]) == list(range(1, 26))
    assert loss.set_index("step")["value"][25] == 125.0 and loss.set_index("step")["value"][20] == 0.2
    assert list(run.spectra()["step"]) == [10, 20] and set(run.evals()["step"]) == {10, 20}
    assert run.checkpoints().empty and run.analysis().empty  # both were at step 30
    assert (path / "checkpoints" / "step_000000030.safetensors").exists()  # the file itself stays
    assert list(run.events()["kind"]) == ["resume"]
    assert list(run.status_history()["status"]) == ["running", "diverged", "running", "finished"]


def test_rows_reach_readers_once_a_batch_fills_or_its_time_is_up(tmp_path):
    with RunWriter.create(tmp_path, "rows", {}, experiment="t", flush_rows=10, flush_seconds=1e9) as w:
        for step in range(1, 4):
            w.log(step, {"a": 1.0, "b": 2.0, "c": 3.0})
        assert Run(tmp_path / "rows").scalars().empty  # 9 values: still buffered
        w.log(4, {"a": 1.0, "b": 2.0, "c": 3.0})
        assert len(Run(tmp_path / "rows").scalars()) == 12
    with RunWriter.create(tmp_path, "time", {}, experiment="t", flush_rows=10**9, flush_seconds=0.0) as w:
        w.log(1, {"loss": 1.0})
        assert len(Run(tmp_path / "time").scalars()) == 1


def test_logging_a_step_before_the_last_one_is_refused(tmp_path):
    with RunWriter.create(tmp_path, "r", {}, experiment="t") as w:
        w.log(5, {"loss": 1.0})
        w.log(5, {"lr": 0.1})  # the same step again merges
        with pytest.raises(ValueError, match="must not go back"):
            w.log(4, {"loss": 1.0})
    assert Run(tmp_path / "r").scalars().values.tolist() == [[5, "loss", 1.0], [5, "lr", 0.1]]


def test_a_bad_scalar_names_itself_and_leaves_no_partial_row(tmp_path):
    with RunWriter.create(tmp_path, "r", {}, experiment="t") as w:
        with pytest.raises(ValueError, match="'lr' at step 1"):
            w.log(1, {"loss": 1.0, "lr": "fast"})
    assert Run(tmp_path / "r").scalars().empty


def test_status_moves_from_running_once_and_an_escaping_exception_marks_failed(tmp_path):
    with pytest.raises(RuntimeError):
        with RunWriter.create(tmp_path, "crash", {}, experiment="t") as w:
            w.log(3, {"loss": 1.0})
            raise RuntimeError("out of memory")
    assert Run(tmp_path / "crash").status()["reason"] == "RuntimeError: out of memory"
    assert Run(tmp_path / "crash").status()["status"] == "failed"
    with RunWriter.create(tmp_path, "div", {}, experiment="t") as w:
        w.log(7, {"loss": math.nan})
        w.set_status("diverged", reason="loss is NaN")
        with pytest.raises(StoreError, match="already diverged"):
            w.set_status("finished")
        with pytest.raises(ValueError, match="allowed"):
            w.set_status("exploded")
    status = Run(tmp_path / "div").status()
    assert (status["status"], status["step"], status["reason"]) == ("diverged", 7, "loss is NaN")
    assert math.isnan(Run(tmp_path / "div").summary()["final_loss"])  # a diverged run keeps everything


def test_create_refuses_an_existing_run_and_malformed_ids(tmp_path):
    write_run(tmp_path, "r")
    before = files(tmp_path / "r")
    with pytest.raises(StoreError, match="already exists"):
        RunWriter.create(tmp_path, "r", {}, experiment="t")
    assert files(tmp_path / "r") == before
    for bad in ("a/b/c", "../r", ".hidden", "a//b", ""):
        with pytest.raises(ValueError, match="run id"):
            RunWriter.create(tmp_path, bad, {}, experiment="t")
    with pytest.raises(StoreError, match="JSON"):
        RunWriter.create(tmp_path, "obj", {"x": object()}, experiment="t")
    assert not (tmp_path / "obj").exists()


def test_a_second_writer_on_a_live_run_is_refused(tmp_path):
    with RunWriter.create(tmp_path, "r", {}, experiment="t"):
        assert Run(tmp_path / "r").alive()
        with pytest.raises(StoreError, match="another process is writing"):
            RunWriter.attach(tmp_path / "r")
    assert not Run(tmp_path / "r").alive()


def test_a_checkpoint_outside_the_run_directory_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    with RunWriter.create(tmp_path / "lab", "r", {}, experiment="t") as w:
        with pytest.raises(StoreError, match="outside the run directory"):
            w.add_checkpoint(1, outside)


def test_a_removed_checkpoint_leaves_the_index_and_the_disk(tmp_path):
    with RunWriter.create(tmp_path, "r", {}, experiment="t") as w:
        for step in (1, 2):
            for path in (w.checkpoint_path(step), w.checkpoint_path(step).with_suffix(".pt")):
                path.write_bytes(b"weights")
                w.add_checkpoint(step, path)
        w.remove_checkpoint(1)
    assert Run(tmp_path / "r").checkpoints()["step"].tolist() == [2, 2]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == [
        "step_000000002.pt", "step_000000002.safetensors"]


# ---- processes and crashes -----------------------------------------------------------

LIVE_WRITER = """
lab = sys.argv[1]
w = RunWriter.create(lab, "live", {"lr": 0.001}, experiment="t", flush_rows=10**9, flush_seconds=1e9)
step = 0
for batch in range(3):
    for _ in range(50):
        step += 1
        w.log(step, {"loss": 1.0 / step})
    if batch < 2:
        w.flush()
    print(step, flush=True)
    sys.stdin.readline()
w.close()
"""


LIVE_READER = """
for line in sys.stdin:
    run = Run(sys.argv[1])
    print(len(run.scalars()), run.status()["alive"], run.status()["status"], flush=True)
"""


def test_a_reader_process_sees_flushed_rows_while_the_writer_process_runs(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", PREAMBLE + LIVE_WRITER, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    reader = subprocess.Popen([sys.executable, "-c", PREAMBLE + LIVE_READER, str(tmp_path / "live")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        seen = []
        for _ in range(3):
            flushed = int(writer.stdout.readline())
            reader.stdin.write("read\n")
            reader.stdin.flush()
            seen.append((flushed, reader.stdout.readline().split()))
            writer.stdin.write("\n")
            writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
        reader.kill()
    # the third batch was not flushed yet when the reader looked
    assert seen == [(50, ["50", "True", "running"]), (100, ["100", "True", "running"]),
                    (150, ["100", "True", "running"])]
    assert len(Run(tmp_path / "live").scalars()) == 150  # close flushed it


def test_a_writer_killed_with_sigkill_leaves_a_readable_store_with_every_flushed_row(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", PREAMBLE + LIVE_WRITER, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        writer.stdout.readline()
        writer.stdin.write("\n")
        writer.stdin.flush()
        writer.stdout.readline()  # 100 flushed
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert int(writer.stdout.readline()) == 150  # 50 more logged, unflushed
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    run = Run(tmp_path / "live")
    assert list(run.scalars()["step"]) == list(range(1, 101))
    summary = store.list_runs(tmp_path).iloc[0]
    assert summary["readable"] and summary["status"] == "running" and not summary["alive"]
    assert summary["last_step"] == 100
    with sqlite3.connect(run.db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with RunWriter.resume(run.path, 100) as w:  # and the run carries on
        w.log(101, {"loss": 0.5})
    assert run.status()["status"] == "finished" and run.summary()["last_step"] == 101


# ---- portability and safety of reading -----------------------------------------------

READ_ALL = """
for path in sys.argv[1:]:
    run = Run(path)
    print(len(run.scalars()), run.status()["status"], len(run.spectra()), len(run.traces()))
"""


def test_a_run_copied_elsewhere_and_made_read_only_still_opens_and_reads(tmp_path, read_only):
    finished = write_run(tmp_path / "lab", "finished")
    killed_dir = tmp_path / "killed"
    writer = subprocess.Popen([sys.executable, "-c", PREAMBLE + LIVE_WRITER, str(killed_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    writer.stdout.readline()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    killed = killed_dir / "live"
    assert (killed / "run.db-wal").exists()  # its rows are still in the write-ahead log
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(finished, elsewhere / "finished")
    shutil.copytree(killed, elsewhere / "killed")
    shutil.copytree(killed, elsewhere / "killed-no-shm", ignore=shutil.ignore_patterns("*-shm"))
    read_only(elsewhere)
    expected = {"finished": "93 finished 3 2", "killed": "50 running 0 0", "killed-no-shm": "50 running 0 0"}
    before = files(elsewhere)
    result = python(READ_ALL, *(str(elsewhere / name) for name in expected), obey_permissions=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == list(expected.values())
    assert files(elsewhere) == before  # reading changed nothing


def test_reading_writes_nothing_and_the_token_changes_only_when_the_run_grows(tmp_path):
    path = write_run(tmp_path, "r")
    before, token = files(path), Run(path).token()
    run = Run(path)
    store.list_runs(tmp_path), run.tables(), run.status(), store.export_run(run, tmp_path / "out")
    assert files(path) == before and run.token() == token
    with RunWriter.attach(path) as w:
        live = w
        w.log(40, {"loss": 0.1})
        w.flush()
        grown = run.token()
        assert grown != token
        assert Run(path).scalars(["loss"])["step"].iloc[-1] == 40  # readable mid-write
        before_live = files(path)
        run.summary()
        assert Run(path).token() == grown and files(path).keys() == before_live.keys()
    assert live.status == "finished" and run.status()["status"] == "finished"  # attach leaves status alone
    assert sorted(p.name for p in path.iterdir()) == ["checkpoints", "config.json", "run.db", "writer.lock"]
    with sqlite3.connect(f"{(path / 'run.db').as_uri()}?mode=ro", uri=True) as con:  # a closed run is
        assert con.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # one plain file again


def test_a_writer_closing_while_a_reader_holds_the_run_open_leaves_it_readable(tmp_path):
    writer = RunWriter.create(tmp_path, "r", {}, experiment="t")
    writer.log(1, {"loss": 1.0})
    writer.flush()
    held = sqlite3.connect(f"{(tmp_path / 'r' / 'run.db').as_uri()}?mode=ro", uri=True)  # a slow dashboard
    held.execute("SELECT * FROM scalars").fetchall()
    writer.log(2, {"loss": 0.5})
    writer.close()  # cannot leave WAL mode while `held` is open: the run stays WAL, nothing is lost
    assert (tmp_path / "r" / "run.db-wal").exists()
    assert Run(tmp_path / "r").scalars()["value"].tolist() == [1.0, 0.5]
    with RunWriter.resume(tmp_path / "r", 2) as w:
        w.log(3, {"loss": 0.25})
    held.close()
    assert Run(tmp_path / "r").scalars()["step"].tolist() == [1, 2, 3]


def test_a_pickled_run_reads_after_the_original_and_its_private_copy_are_gone(tmp_path):
    with RunWriter.create(tmp_path / "lab", "r", {}, experiment="t") as w:
        w.log(1, {"loss": 1.0})
        w.flush()
        (tmp_path / "copy").mkdir()  # a live run copied without its -shm: read through a private copy
        for name in ("run.db", "run.db-wal"):
            shutil.copyfile(tmp_path / "lab" / "r" / name, tmp_path / "copy" / name)
    original = Run(tmp_path / "copy")
    assert original.scalars()["value"].tolist() == [1.0]
    clone = pickle.loads(pickle.dumps(original))
    del original
    gc.collect()
    assert clone.scalars()["value"].tolist() == [1.0]
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["run.db", "run.db-wal"]


def test_a_newer_schema_version_is_refused_with_a_clear_error(tmp_path):
    write_run(tmp_path, "future")
    with sqlite3.connect(tmp_path / "future" / "run.db") as con:  # as a later stabilitylab would leave it
        con.execute("PRAGMA user_version = 3")
    with pytest.raises(SchemaVersionError, match="schema v3; this stabilitylab reads up to v2. Fix: upgrade"):
        Run(tmp_path / "future").scalars()
    with pytest.raises(SchemaVersionError, match="v3"):
        RunWriter.resume(tmp_path / "future", 5)
    row = store.list_runs(tmp_path).iloc[0]
    assert not row["readable"] and "schema v3" in row["error"]


def test_a_corrupt_database_is_listed_unreadable_while_the_other_runs_list_fine(tmp_path):
    write_run(tmp_path, "group/good")
    write_run(tmp_path, "bad")
    (tmp_path / "bad" / "run.db").write_bytes(os.urandom(4096))
    write_run(tmp_path, "truncated")
    with open(tmp_path / "truncated" / "run.db", "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(4096))  # a valid header over garbage pages
    table = store.list_runs(tmp_path).set_index("run_id")
    assert list(table.index) == ["bad", "group/good", "truncated"]
    assert table.loc["group/good", "readable"] and table.loc["group/good", "final_loss"] == pytest.approx(4 / 30)
    assert not table.loc["bad", "readable"] and "not an SQLite database" in table.loc["bad", "error"]
    assert not table.loc["truncated", "readable"] and table.loc["truncated", "error"]


def test_a_non_writable_lab_gives_a_clear_error_and_leaves_existing_runs_untouched(tmp_path, read_only):
    lab = tmp_path / "lab"
    write_run(lab, "existing")
    read_only(lab)
    before = files(lab)
    result = python("""
try:
    RunWriter.create(sys.argv[1], "new", {}, experiment="t")
except StoreError as err:
    print(err)
try:
    RunWriter.resume(sys.argv[1] + "/existing", 3)
except StoreError as err:
    print(err)
""", str(lab), obey_permissions=True)
    assert result.returncode == 0, result.stderr
    create_error, resume_error = result.stdout.splitlines()
    assert create_error.startswith(f"{lab}: cannot create run 'new'") and f"chmod u+w {lab}" in create_error
    assert resume_error.startswith(f"{lab / 'existing'}: cannot write") and "chmod -R u+w" in resume_error
    assert files(lab) == before
    assert store.list_runs(lab)["status"].tolist() == ["finished"]


# ---- labs and several runs -----------------------------------------------------------

def test_list_runs_finds_flat_and_grouped_runs_with_their_summary(tmp_path):
    write_run(tmp_path, "solo", steps=20)
    write_run(tmp_path, "sweep/lr-1", steps=30, finish=False, sweep_cell="lr=1e-3", seed=3)
    (tmp_path / ".trash" / "x").mkdir(parents=True)
    table = store.list_runs(tmp_path)
    assert table["run_id"].tolist() == ["solo", "sweep/lr-1"]
    assert list(table.columns[:len(store.SUMMARY_COLUMNS)]) == list(store.SUMMARY_COLUMNS)
    row = table.set_index("run_id").loc["sweep/lr-1"]
    assert (row["status"], row["status_step"], row["status_reason"]) == ("diverged", 30, "loss is NaN")
    assert (row["sweep_cell"], row["seed"], row["last_step"]) == ("lr=1e-3", 3, 30)
    assert row["max_rho"] == pytest.approx(abs(0.5 + 0.1j)) and row["max_state_norm"] == 30.0
    assert row["config.model.injection"] == "parcae" and row["config.train.lr"] == 1e-3
    assert store.lab_token(tmp_path) == store.lab_token(tmp_path)
    token = store.lab_token(tmp_path)
    write_run(tmp_path, "later")
    assert store.lab_token(tmp_path) != token
    with pytest.raises(StoreError, match="no such lab directory"):
        store.list_runs(tmp_path / "nowhere")


def test_read_scalars_of_several_runs_long_or_wide_with_step_range_and_stride(tmp_path):
    runs = [Run(write_run(tmp_path, f"r{i}", steps=30)) for i in range(3)]
    long = store.read_scalars(runs, ["loss", "lr", "never-logged"], start=10, stop=30, stride=5)
    assert list(long.columns) == ["run", "step", "name", "value"]
    assert sorted(set(long["step"])) == [10, 15, 20, 25] and len(long) == 3 * 2 * 4
    wide = store.read_scalars(runs, ["loss", "lr"], start=10, stop=30, stride=5, wide=True)
    assert list(wide.columns) == ["run", "step", "loss", "lr"] and len(wide) == 12
    assert wide.set_index(["run", "step"]).loc[("r1", 20), "loss"] == 0.2
    assert store.read_scalars([], ["loss"]).empty


def test_open_run_takes_a_path_or_a_run_id_in_the_lab(tmp_path):
    write_run(tmp_path, "g/r")
    assert store.open_run(tmp_path / "g" / "r").path == tmp_path / "g" / "r"
    assert store.open_run("g/r", tmp_path).id == "g/r"
    with pytest.raises(StoreError, match="stabilitylab runs"):
        store.open_run("missing", tmp_path)


def test_the_store_module_imports_no_torch_and_no_model_code():
    """The store reads only the names list (which imports nothing) of the rest of the lab."""
    result = python("import stabilitylab.store; print(sorted(m for m in sys.modules if m.startswith('stabilitylab')))")
    assert result.returncode == 0, result.stderr
    loaded = ast.literal_eval(result.stdout)
    assert set(loaded) - {"stabilitylab", "stabilitylab.records"} == {
        f"stabilitylab.store{part}" for part in ("", ".schema", ".writer", ".reader", ".lab", ".publish")}


# ---- command line ----------------------------------------------------------------------

def test_cli_lists_runs_and_exports_one(tmp_path, capsys):
    from stabilitylab.cli import main

    write_run(tmp_path / "lab", "a")
    write_run(tmp_path / "lab", "b", finish=False)
    (tmp_path / "lab" / "c").mkdir()
    (tmp_path / "lab" / "c" / "run.db").write_bytes(b"garbage")
    assert main(["runs", str(tmp_path / "lab")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "status", "steps"]
    assert out[1].split()[:5] == ["a", "finished", "30", "0.1333", "0.5099"]
    assert out[2].split()[:2] == ["b", "diverged@30"] and "loss is NaN" in out[2]
    assert out[3].split()[:2] == ["c", "unreadable:"]
    assert main(["export", "a", "--lab", str(tmp_path / "lab"), "--format", "parquet",
                 "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "scalars.parquet").exists()
    assert main(["runs", str(tmp_path / "none")]) == 2
    assert "no such lab directory" in capsys.readouterr().err


def test_compacting_a_run_drops_its_checkpoints_and_keeps_every_metric(tmp_path):
    run_dir = write_run(tmp_path / "lab", finish=False)
    before = Run(run_dir).tables()
    assert store.compact_run(run_dir) > 0
    after = Run(run_dir).tables()
    assert after["checkpoints"].empty and not (run_dir / "checkpoints").exists()
    assert not (run_dir / "writer.lock").exists()
    for name, table in before.items():
        if name != "checkpoints":
            pd.testing.assert_frame_equal(table, after[name], check_dtype=False, obj=name)
    assert Run(run_dir).status()["status"] == "diverged"


def test_a_run_with_a_live_writer_is_not_compacted(tmp_path):
    with RunWriter.create(tmp_path / "lab", "live", {}, experiment="x") as w:
        w.log(1, {"loss": 1.0})
        with pytest.raises(StoreError):
            store.compact_run(tmp_path / "lab" / "live")
