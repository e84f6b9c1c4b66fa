"""Fault injection on the run store (docs/store.md, "The promise"): live reads see one commit,
kill -9 loses only what was not committed, a damaged or torn file is an UnreadableRunError
that lab-wide operations report and go past, writers never write into a damaged database,
a full disk ends the run 'failed' with everything committed kept, a read-only lab reads."""

import hashlib
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

import live_writer
from stabilitylab import store
from stabilitylab.analysis.events import analyse_runs
from stabilitylab.analysis.sweep import sweep_points
from stabilitylab.config import DivergenceConfig
from stabilitylab.store import Run, RunWriter, StoreError, UnreadableRunError

ROOT = str(Path(store.__file__).resolve().parents[2])
NAMES = live_writer.NAMES  # every step logs each of them as the step number
CONFIG = {"model": {"injection": "parcae", "mean_recurrence": 4}, "divergence": asdict(DivergenceConfig())}


def child(code: str, *args: str, limit_bytes: int | None = None, **popen) -> subprocess.Popen:
    """A Python process running `code` on this checkout's stabilitylab (RLIMIT_FSIZE: each
    file it writes stops growing at limit_bytes; Python ignores SIGXFSZ, so writes fail)."""
    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, "-c", code, *args], env={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                            preexec_fn=limit, text=True, **popen)


WRITE_RUN = f"""
import os, sys
from stabilitylab.store import RunWriter
w = RunWriter.create(sys.argv[1], sys.argv[2], {CONFIG!r}, experiment="faults", flush_rows=500)
for step in range(1, int(sys.argv[3]) + 1):
    w.log(step, dict.fromkeys({NAMES!r}, float(step)))
    if step % 10 == 0:
        w.log_trace(step, {{"state_norm_mean": [1.0, 2.0], "delta_norm_mean": [0.5, 0.25]}})
        w.log_eval(step, 4, {{"val_loss": 5.0 / step}})
if sys.argv[4] == "finish":
    w.__exit__(None, None, None)
else:
    w.flush()
    os._exit(0)  # as kill -9 leaves it: nothing closed, WAL mode, -wal and -shm beside run.db
"""


def write_run(lab: Path, run_id: str, steps: int = 300, *, finish: bool = True) -> Path:
    """A run (in a child process) whose step s logs every name as s, so a torn read shows; a
    trace and an eval every 10 steps. Not finished: left as a killed writer leaves it."""
    writer = child(WRITE_RUN, str(lab), run_id, str(steps), "finish" if finish else "kill")
    assert writer.wait(timeout=120) == 0
    return lab / run_id


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def damage_page(db: Path, page: int) -> None:
    """Overwrite one page (1-based) with seeded random bytes; the header (page 1) stays valid."""
    size = sqlite3.connect(db).execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(np.random.default_rng(page).bytes(size))


def root_page(db: Path, table: str) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]


def assert_prefix(run: Run) -> int:
    """Every committed step is whole: steps 1..k, each with every name equal to its step."""
    wide = store.read_scalars([run], NAMES, wide=True)
    steps = wide["step"].to_numpy()
    assert (steps == np.arange(1, len(steps) + 1)).all()
    assert (wide[list(NAMES)].to_numpy() == steps[:, None]).all()
    return len(steps)


def every_read(run: Run) -> None:
    """Every reader verb, each either reading or raising UnreadableRunError (never SQLite's error)."""
    for read in (run.meta, run.status, run.status_history, run.summary, run.scalar_names, run.scalars, run.traces,
                 run.spectra, run.evals, run.events, run.analysis, run.results, run.checkpoints, run.tables):
        try:
            read()
        except UnreadableRunError as err:
            assert str(err).startswith(str(run.db)) and "Fix: " in str(err) and "\n" not in str(err)


# ---- live reads ------------------------------------------------------------------------------

def test_live_reads_see_one_commit_of_a_writer_committing_every_step(tmp_path):
    """1500 reads (wide, long as the dashboard reads, summary; 500 each) of a run a writer
    process commits every step of. With one statement per read, 458 of 3000 were torn here."""
    counts = live_writer.count_torn_reads(tmp_path, 1500)
    assert counts["steps"] > 100, counts  # the reads overlapped many commits
    assert {k: counts[k] for k in live_writer.KINDS} == {"wide": 0, "long": 0, "summary": 0}, counts


# ---- kill -9 ---------------------------------------------------------------------------------

KILLED_WRITER = f"""
import sys
import numpy as np
from stabilitylab.store import RunWriter
rng = np.random.default_rng(int(sys.argv[2]))
with RunWriter.create(sys.argv[1], "killed", {{}}, experiment="faults", flush_rows=int(rng.integers(1, 200)),
                      flush_seconds=0.05) as w:
    for step in range(1, 10**9):
        w.log(step, dict.fromkeys({NAMES!r}, float(step)))
        if step % 10 == 0:
            w.log_trace(step, {{"state_norm_mean": [float(step)] * 8}})
        if rng.random() < 0.01:
            w.log_event(step, "spike", "seeded")  # written at once: everything before it is committed
            print(step, flush=True)
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_point_loses_only_uncommitted_steps_while_a_reader_reads(tmp_path, seed):
    rng = np.random.default_rng(seed)
    writer = child(KILLED_WRITER, str(tmp_path), str(seed), stdout=subprocess.PIPE)
    run_dir = tmp_path / "killed"
    deadline = time.monotonic() + 60
    while not (run_dir / "run.db").exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.01)
    run, last, kill_at = Run(run_dir, "killed"), 0, time.monotonic() + rng.uniform(0.3, 1.5)
    while time.monotonic() < kill_at:  # a reader running while the writer writes
        for kind in live_writer.KINDS:
            bad, last = live_writer.torn(run, kind, max(0, last - 20))
            assert not bad
    writer.send_signal(signal.SIGKILL)
    committed = [int(line) for line in writer.communicate()[0].split()]
    assert writer.returncode == -signal.SIGKILL
    status = run.status()
    assert (status["status"], status["alive"]) == ("running", False)
    run.check()
    kept = assert_prefix(run)
    assert kept >= max(committed, default=0) and kept >= last, (kept, committed[-3:], last)
    traced, expected = list(run.traces()["state_norm_mean"].steps), list(range(10, kept + 1, 10))
    # a step's trace is logged after its scalars: a flush between the two calls commits the
    # step without its trace, and a kill right then loses only that trace
    assert traced == expected or (kept % 10 == 0 and traced == expected[:-1])
    with RunWriter.resume(run_dir, kept) as w:  # a killed run resumes where its last commit ended
        w.log(kept + 1, dict.fromkeys(NAMES, float(kept + 1)))
    assert assert_prefix(Run(run_dir)) == kept + 1 and Run(run_dir).status()["status"] == "finished"


RESUME_AND_DIE = f"""
import os, sys
from stabilitylab.store import RunWriter
w = RunWriter.resume(sys.argv[1], int(sys.argv[2]))
for step in range(int(sys.argv[2]) + 1, int(sys.argv[3]) + 1):
    w.log(step, dict.fromkeys({NAMES!r}, float(step)))
w.flush()
os._exit(0)
"""


def test_a_run_read_from_a_private_copy_sees_every_commit_made_since_the_copy(tmp_path):
    """A WAL run without its -shm (copied, or a writer's first moments) is read from a
    private copy; a Run that copied once must copy again after a commit, never serve the old one."""
    run_dir = write_run(tmp_path, "copied", steps=20, finish=False)
    shm = run_dir / "run.db-shm"
    shm.unlink()
    run = Run(run_dir)
    assert assert_prefix(run) == 20 and run._copy is not None
    assert child(RESUME_AND_DIE, str(run_dir), "20", "30").wait(timeout=120) == 0
    shm.unlink()
    assert assert_prefix(run) == 30


# ---- torn and damaged files ------------------------------------------------------------------

def test_a_damaged_page_in_the_middle_is_reported_by_every_verb_and_never_written_into(tmp_path):
    good = write_run(tmp_path, "good")
    bad = write_run(tmp_path, "bad", steps=3000)
    db = bad / "run.db"
    pages = db.stat().st_size // sqlite3.connect(db).execute("PRAGMA page_size").fetchone()[0]
    damage_page(db, pages // 2)
    before = sha(db)
    with pytest.raises(UnreadableRunError, match="damaged database .*Fix: restore run.db from a copy"):
        Run(bad).check()
    every_read(Run(bad, "bad"))
    table = store.list_runs(tmp_path, check=True).set_index("run_id")
    assert not table.loc["bad", "readable"] and "damaged database" in table.loc["bad", "error"]
    assert table.loc["good", "readable"] and table.loc["good", "last_step"] == 300
    for open_writer in (lambda: RunWriter.attach(bad), lambda: RunWriter.resume(bad, 10)):
        with pytest.raises(UnreadableRunError) as err:
            open_writer()
        message = str(err.value)
        assert message.startswith(str(db)) and "refusing to write into it" in message
        assert "Fix: restore run.db from a copy, or move the run out of the lab" in message and "\n" not in message
    compacted = dict(store.compact_lab(tmp_path))
    assert isinstance(compacted[bad], UnreadableRunError) and isinstance(compacted[good], int)
    assert sha(db) == before and not (bad / "run.db-wal").exists()


def test_a_damaged_scalars_page_is_unreadable_to_every_lab_wide_reader_which_goes_on(tmp_path):
    """The scalars table's root page: the summary, the events, the sweep points and
    analyze's write-back all meet it; each reports this run and reads the other."""
    good = write_run(tmp_path, "good")
    bad = write_run(tmp_path, "bad")
    damage_page(bad / "run.db", root_page(bad / "run.db", "scalars"))
    table = store.list_runs(tmp_path).set_index("run_id")
    assert not table.loc["bad", "readable"] and table.loc["bad", "error"].startswith(str(bad / "run.db"))
    assert table.loc["good", "readable"]
    with pytest.raises(UnreadableRunError, match="Fix: restore run.db"):
        store.read_scalars([Run(good), Run(bad)], wide=True)
    with pytest.raises(UnreadableRunError):
        store.export_run(Run(bad), tmp_path / "export")
    runs = store.find_runs(tmp_path)
    reports, skipped = analyse_runs(runs)
    assert list(reports) == ["good"] and list(skipped) == ["bad"] and "damaged database" in skipped["bad"]
    unreadable: dict[str, str] = {}
    points = sweep_points(runs, unreadable=unreadable)
    assert set(points["run"]) == {"good"} and list(unreadable) == ["bad"]
    from stabilitylab.analyze import record  # analyze's write into a run: refused before anything is written

    before = sha(bad / "run.db")
    with pytest.raises(UnreadableRunError, match="refusing to write"):
        record(Run(bad), [])
    assert sha(bad / "run.db") == before


@pytest.mark.parametrize("tear", ["empty", "garbage", "half", "wal"])
def test_a_torn_file_is_unreadable_or_reads_its_last_whole_commit(tmp_path, tear):
    write_run(tmp_path, "good")
    torn = write_run(tmp_path, "torn", steps=2000, finish=tear != "wal")
    db = torn / "run.db"
    if tear == "empty":
        db.write_bytes(b"")
    elif tear == "garbage":
        db.write_bytes(os.urandom(8192))
    elif tear == "half":
        os.truncate(db, db.stat().st_size // 2)
    else:  # a killed writer's -wal cut mid-frame: the last commit is incomplete, so it is not read
        wal = Path(f"{db}-wal")
        os.truncate(wal, wal.stat().st_size - 1000)
    table = store.list_runs(tmp_path, check=True).set_index("run_id")
    assert table.loc["good", "readable"]
    if tear == "wal":
        assert table.loc["torn", "readable"]
        kept = assert_prefix(Run(torn))
        assert 0 < kept < 2000
        with RunWriter.resume(torn, kept) as w:
            w.log(kept + 1, dict.fromkeys(NAMES, float(kept + 1)))
        assert assert_prefix(Run(torn)) == kept + 1
        return
    assert not table.loc["torn", "readable"]
    every_read(Run(torn, "torn"))
    before = sha(db)
    with pytest.raises(StoreError):  # unreadable, or (an empty file) not a run store: never written
        RunWriter.attach(torn)
    assert sha(db) == before


# ---- a full disk -----------------------------------------------------------------------------

FILLING_WRITER = f"""
import sys
from stabilitylab.store import RunWriter
with RunWriter.create(sys.argv[1], "full", {{}}, experiment="faults", flush_rows=400) as w:
    for step in range(1, 10**9):
        w.log(step, dict.fromkeys({NAMES!r}, float(step)))
        w.log_trace(step, {{"state_norm_mean": [float(step)] * 16}})
        if step % 50 == 0:
            w.log_event(step, "spike", "committed")
            print(step, flush=True)
"""


def fill_the_disk(lab: Path, limit_bytes: int | None = None) -> tuple[list[int], str]:
    """Run FILLING_WRITER until its disk is full: (steps it saw committed, its stderr)."""
    writer = child(FILLING_WRITER, str(lab), limit_bytes=limit_bytes, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 1, err
    return [int(line) for line in out.split()], err


def assert_failed_and_kept(run_dir: Path, committed: list[int], err: str) -> None:
    assert err.strip().splitlines()[-1].startswith(f"stabilitylab.store.schema.StoreError: {run_dir}: cannot write (")
    run = Run(run_dir)
    status = run.status()
    assert status["status"] == "failed" and "cannot write" in status["reason"], status
    assert "values logged since the last commit were not written" in status["reason"]
    run.check()
    kept = assert_prefix(run)
    assert committed and kept >= committed[-1]
    assert len(run.traces()["state_norm_mean"].steps) == kept


def test_a_full_disk_ends_the_run_failed_with_the_reason_and_keeps_every_commit(tmp_path):
    """Each file limited to 256 KiB (RLIMIT_FSIZE in the writer process)."""
    committed, err = fill_the_disk(tmp_path, limit_bytes=256 * 1024)
    assert_failed_and_kept(tmp_path / "full", committed, err)
    with RunWriter.resume(tmp_path / "full", committed[-1]) as w:  # room again: it continues
        w.log(committed[-1] + 1, dict.fromkeys(NAMES, float(committed[-1] + 1)))


def test_a_full_tmpfs_ends_the_run_failed_with_the_reason_and_keeps_every_commit(tmp_path):
    """A real ENOSPC: a 400 KiB tmpfs (needs root and mount; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        committed, err = fill_the_disk(disk)
        assert "database or disk is full" in err
        assert_failed_and_kept(disk / "full", committed, err)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---- a read-only lab, and the creation race ------------------------------------------------------

READ_ONLY_LAB = """
import sys
from pathlib import Path
from stabilitylab import store
from stabilitylab.store import RunWriter, StoreError
lab = Path(sys.argv[1])
table = store.list_runs(lab, check=True)
print("readable", sorted(table[table.readable.astype(bool)].run_id))
print("killed_rows", len(store.open_run("killed", lab).scalars(["loss"])))
print("exported", len(store.export_run(store.open_run("done", lab), sys.argv[2])))
for name, write in (("create", lambda: RunWriter.create(lab, "new", {}, experiment="t")),
                    ("attach", lambda: RunWriter.attach(lab / "done")),
                    ("resume", lambda: RunWriter.resume(lab / "killed", 5))):
    try:
        write()
    except StoreError as err:
        print(name, "refused:", err)
print("compact", [type(r).__name__ for _, r in store.compact_lab(lab)])
"""


def test_a_read_only_lab_reads_and_every_writer_refuses_it_in_one_line(tmp_path):
    lab = tmp_path / "lab"
    write_run(lab, "done")
    write_run(lab, "killed", finish=False)  # WAL: -wal and -shm stay, and readers cannot lock them
    for path in [lab, *lab.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = {p: sha(p) for p in lab.rglob("*") if p.is_file()}
    command = [shutil.which("setpriv") or "", "--bounding-set=-dac_override,-dac_read_search"]
    if os.geteuid() != 0:
        command = []
    elif not command[0]:
        pytest.skip("running as root without setpriv: chmod cannot bind this test")
    try:
        result = subprocess.run([*command, sys.executable, "-c", READ_ONLY_LAB, str(lab), str(tmp_path / "out")],
                                env={"PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
    finally:
        for path in [lab, *lab.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["readable"] == "['done', 'killed']" and lines["killed_rows"] == "300"
    assert lines["create"].startswith(f"refused: {lab}: cannot create run 'new'")
    assert lines["attach"].startswith(f"refused: {lab / 'done'}: cannot write") and "chmod -R u+w" in lines["attach"]
    assert lines["resume"].startswith(f"refused: {lab / 'killed'}: cannot write")
    assert lines["compact"] == "['StoreError', 'StoreError']"
    assert {p: sha(p) for p in lab.rglob("*") if p.is_file()} == before


def test_the_loser_of_a_creation_race_is_told_to_choose_another_id(tmp_path, monkeypatch):
    from stabilitylab.store import writer

    build = writer._build_run

    def build_then_lose(tmp: Path, *args) -> None:
        build(tmp, *args)
        monkeypatch.setattr(writer, "_build_run", build)
        RunWriter.create(tmp_path, "r", {}, experiment="winner").close()  # the other process renames first

    monkeypatch.setattr(writer, "_build_run", build_then_lose)
    with pytest.raises(StoreError) as err:
        RunWriter.create(tmp_path, "r", {}, experiment="loser")
    assert "another process created a run with this id at the same moment" in str(err.value)
    assert "choose a new run id" in str(err.value) and "chmod" not in str(err.value)
    assert Run(tmp_path / "r").meta()["experiment"] == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # the loser's hidden directory is gone


def test_the_cli_reports_a_damaged_run_in_one_line_and_goes_on_with_the_lab(tmp_path, capsys):
    from stabilitylab.analysis.fits import lab_points
    from stabilitylab.cli import main

    write_run(tmp_path, "good")
    bad = write_run(tmp_path, "bad")
    damage_page(bad / "run.db", root_page(bad / "run.db", "scalars"))
    assert main(["runs", str(tmp_path)]) == 0
    assert any(line.startswith("bad") and "unreadable" in line for line in capsys.readouterr().out.splitlines())
    assert main(["export", "bad", "--lab", str(tmp_path), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stabilitylab export: {bad / 'run.db'}: damaged database") and "\n" not in err
    assert main(["events", str(tmp_path), "--write"]) == 0
    out = capsys.readouterr().out
    assert "bad: skipped (" in out and "damaged database" in out and "good  [finished]" in out and "wrote" in out
    points = lab_points(tmp_path)
    assert set(points.done["run"]) == {"good"} and "damaged database" in points.unreadable["bad"]
