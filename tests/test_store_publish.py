"""The run store on a shared filesystem: mount detection, publish mode, kill -9 mid-publish.

Publish mode is forced with STABILITYLAB_STORE_MODE=publish (this machine's disks are
local); the writer's node-local database lives in STABILITYLAB_SCRATCH.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stabilitylab.store import RunWriter, StoreError, list_runs, open_run, read_scalars
from stabilitylab.store.publish import (PUBLISH_PREFIX, filesystem_type, is_network, parse_mountinfo,
                                        store_mode)

ROOT = str(Path(__file__).resolve().parents[1])

MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 27 0:50 / /home rw,relatime shared:20 - nfs4 fs1:/export/home rw,vers=4.2
41 27 0:51 / /lustre rw,flock - lustre 10.0.0.1@o2ib:/scratch rw
42 41 0:52 / /lustre/local rw - xfs /dev/nvme0n1 rw
43 27 0:53 / /gpfs/my\040lab rw master:3 - gpfs gpfs0 rw
44 27 0:54 / /mnt/ssh rw - fuse.sshfs me@host: rw
45 27 0:55 / /var/lib/lxcfs rw - fuse.lxcfs lxcfs rw
46 27 0:56 / /tmp rw - tmpfs tmpfs rw
"""


@pytest.fixture
def publish_env(tmp_path, monkeypatch):
    monkeypatch.setenv("STABILITYLAB_STORE_MODE", "publish")
    monkeypatch.setenv("STABILITYLAB_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("STABILITYLAB_PUBLISH_SECONDS", "3600")  # only checkpoints, statuses and close
    return tmp_path


# ---- detection ----------------------------------------------------------------------------

def test_mountinfo_gives_mount_points_with_escapes_undone_and_types():
    mounts = dict(parse_mountinfo(MOUNTINFO))
    assert mounts["/home"] == "nfs4" and mounts["/gpfs/my lab"] == "gpfs" and mounts["/"] == "ext4"


@pytest.mark.parametrize("path, fstype, network", [
    ("/home/me/runs/a", "nfs4", True), ("/lustre/proj/runs", "lustre", True), ("/lustre/local/runs", "xfs", False),
    ("/gpfs/my lab/runs", "gpfs", True), ("/mnt/ssh/runs", "fuse.sshfs", True), ("/var/lib/lxcfs/x", "fuse.lxcfs", False),
    ("/tmp/runs", "tmpfs", False), ("/homework/runs", "ext4", False), ("/home", "nfs4", True)])
def test_the_longest_mount_point_holding_the_path_decides(path, fstype, network, monkeypatch):
    monkeypatch.delenv("STABILITYLAB_STORE_MODE", raising=False)
    assert filesystem_type(path, MOUNTINFO) == fstype
    assert is_network(fstype) is network
    assert store_mode(path, MOUNTINFO) == ("publish" if network else "wal")


def test_the_environment_forces_the_mode_and_a_wrong_value_is_one_line(monkeypatch):
    monkeypatch.setenv("STABILITYLAB_STORE_MODE", "wal")
    assert store_mode("/home/me/runs", MOUNTINFO) == "wal"
    monkeypatch.setenv("STABILITYLAB_STORE_MODE", "publish")
    assert store_mode("/tmp/runs", MOUNTINFO) == "publish"
    monkeypatch.setenv("STABILITYLAB_STORE_MODE", "nfs")
    with pytest.raises(StoreError, match="STABILITYLAB_STORE_MODE='nfs'.*Fix: set"):
        store_mode("/tmp/runs", MOUNTINFO)


def test_this_machines_own_mount_table_parses():
    assert filesystem_type(ROOT) != "unknown" or not Path("/proc/self/mountinfo").exists()


# ---- publish mode ---------------------------------------------------------------------------

def _files(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir()}


def test_the_lab_holds_only_published_single_file_snapshots(publish_env):
    lab = publish_env / "lab"
    with RunWriter.create(lab, "g/r", {"a": 1}, experiment="g", flush_rows=5) as w:
        for step in range(1, 51):
            w.log(step, {"loss": float(step)})
        assert not {"run.db-wal", "run.db-shm"} & _files(w.run_dir)
        assert w._local.parent.parent == publish_env / "scratch"
        run = open_run("g/r", lab)
        assert run.scalars(["loss"]).empty  # nothing published since create (publish every hour)
        path = w.checkpoint_path(20)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weights")
        w.add_checkpoint(20)  # publishes: a resume on another node needs the index
        assert run.scalars(["loss"]).step.max() == 50
        assert list(run.checkpoints().step) == [20]
    assert _files(lab / "g" / "r") == {"run.db", "config.json", "checkpoints", "writer.lock"}
    assert run.status()["status"] == "finished" and len(run.scalars(["loss"])) == 50
    assert list(list_runs(lab).status) == ["finished"]
    assert not any((publish_env / "scratch").iterdir())  # the local database is gone after the last publish
    with open(lab / "g" / "r" / "run.db", "rb") as f:
        assert f.read(20)[18] == 1  # rollback-journal: any host reads it with mode=ro


def test_publish_seconds_gives_readers_the_run_every_n_seconds(publish_env, monkeypatch):
    monkeypatch.setenv("STABILITYLAB_PUBLISH_SECONDS", "0")  # every flush publishes
    lab = publish_env / "lab"
    with RunWriter.create(lab, "r", {}, experiment="e", flush_rows=1) as w:
        run = open_run("r", lab)
        for step in range(1, 6):
            w.log(step, {"loss": float(step)})
            assert run.scalars(["loss"]).step.max() == step


# ---- kill -9 ----------------------------------------------------------------------------------

WRITER = """
import sys
from stabilitylab.store import RunWriter
lab, resume = sys.argv[1], sys.argv[2] == "resume"
w = RunWriter.resume(lab + "/r", 0) if resume else RunWriter.create(lab, "r", {}, experiment="e", flush_rows=3)
w.flush_rows = 3
print("ready", flush=True)
for step in range(1, 10**7):
    w.log(step, {"loss": float(step), "lr": step / 2, "pad": float(step % 7)})
"""


def _writer(lab: Path, tmp: Path, how: str = "create") -> subprocess.Popen:
    env = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "STABILITYLAB_STORE_MODE": "publish",
           "STABILITYLAB_SCRATCH": str(tmp / "scratch"), "STABILITYLAB_PUBLISH_SECONDS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(lab), how], env=env, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    return proc


def _published_prefix(run_dir: Path) -> int:
    """The published snapshot opens, passes quick_check and holds steps 1..k whole; return k."""
    con = sqlite3.connect(f"{(run_dir / 'run.db').as_uri()}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    finally:
        con.close()
    frame = read_scalars([open_run(run_dir.name, run_dir.parent)], wide=True)
    k = len(frame)
    if k:
        assert list(frame.step) == list(range(1, k + 1))
        assert (frame.loss == frame.step).all() and (frame.lr == frame.step / 2).all()
        assert (frame["pad"] == frame.step % 7).all()
    return k


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kill_9_mid_publish_leaves_the_last_good_snapshot(seed, tmp_path):
    """The writer publishes after every flush of 3 steps, so it spends most of its time
    publishing; kill it at random moments and the lab's run.db is always a whole prefix."""
    lab, rng = tmp_path / "lab", random.Random(seed)
    proc = _writer(lab, tmp_path)
    seen = 0
    try:
        for _ in range(4):
            time.sleep(rng.uniform(0.0, 0.3))
            seen = max(seen, _published_prefix(lab / "r"))  # a reader during publishes
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    k = _published_prefix(lab / "r")
    assert k >= seen  # nothing published was lost
    assert list_runs(lab).alive.tolist() == [False]

    stale = set((lab / "r").glob(f"{PUBLISH_PREFIX}*"))  # a publish the kill interrupted, if any
    proc = _writer(lab, tmp_path, "resume")  # resume drops them
    try:
        assert not stale & set((lab / "r").glob(f"{PUBLISH_PREFIX}*"))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    _published_prefix(lab / "r")


def test_resume_on_a_new_node_continues_from_the_published_snapshot(publish_env, monkeypatch):
    lab = publish_env / "lab"
    proc = _writer(lab, publish_env)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    k = _published_prefix(lab / "r")
    monkeypatch.setenv("STABILITYLAB_SCRATCH", str(publish_env / "other-node"))  # the old scratch is not here
    shutil.rmtree(publish_env / "scratch")
    step = max(k // 2, 1)
    with RunWriter.resume(lab / "r", step) as w:
        for s in range(step + 1, step + 11):
            w.log(s, {"loss": float(s), "lr": s / 2, "pad": float(s % 7)})
    assert _published_prefix(lab / "r") == step + 10
    run = open_run("r", lab)
    assert run.status()["status"] == "finished"
    assert "resume" in set(run.events().kind)


def test_a_removed_checkpoint_leaves_the_published_index_before_its_file_goes(publish_env):
    lab = publish_env / "lab"
    with RunWriter.create(lab, "r", {}, experiment="e") as w:
        for step in (10, 20):
            w.checkpoint_path(step).parent.mkdir(exist_ok=True)
            w.checkpoint_path(step).write_bytes(b"w")
            w.add_checkpoint(step)
        w.remove_checkpoint(10)
        run = open_run("r", lab)
        assert list(run.checkpoints().step) == [20] and not w.checkpoint_path(10).exists()


def test_a_publish_that_fails_keeps_the_scratch_copy_and_names_it(publish_env, monkeypatch):
    from stabilitylab.store import publish as publishing

    lab = publish_env / "lab"
    with pytest.raises(StoreError, match="cannot publish a snapshot to the lab .*the run continues in"):
        with RunWriter.create(lab, "r", {}, experiment="e") as w:
            w.log(1, {"loss": 1.0})
            monkeypatch.setattr(publishing, "publish", lambda con, run_dir: (_ for _ in ()).throw(OSError(28, "full")))
    local = sqlite3.connect(w._local)
    assert local.execute("SELECT status FROM status ORDER BY id DESC LIMIT 1").fetchone() == ("finished",)
    local.close()
    assert open_run("r", lab).status()["status"] == "running"  # the lab keeps the last good snapshot
