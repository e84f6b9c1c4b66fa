"""The run store on a shared (network) filesystem: detect one, and publish atomic snapshots.

SQLite's WAL mode keeps its index in shared memory (`run.db-shm`, mmap'ed), so every
process that opens the database must be on one host. On NFS, Lustre, GPFS, CIFS, BeeGFS
... a writer on a compute node and a dashboard on a login node would each see their own
`-shm` and read torn pages. So on such a filesystem the writer works in **publish mode**:

    node-local scratch/<run>.db    the writer's own database (WAL, as on a local disk)
    lab/<run>/run.db               a published snapshot: one plain (rollback-journal) file

Every `publish_seconds`, at every checkpoint, status change and at close, the writer copies
its database with SQLite's online backup API into `lab/<run>/.run.db.publish-<hex>`,
fsyncs it, `os.replace`s it onto `run.db` and fsyncs the directory. A rename is atomic on
every POSIX filesystem (NFS included: the server does it), so a reader opens either the
old snapshot or the new one, never a mix; a kill -9 mid-publish leaves the previous
snapshot and a stray temporary file (removed by the next writer of the run). Readers need
no change: a snapshot is a plain database they open with `mode=ro`.

The mode comes from STABILITYLAB_STORE_MODE (`publish`, `wal`, or `auto`, the default),
and `auto` reads the mount table (/proc/self/mountinfo) for the run directory.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import tempfile
from pathlib import Path

from stabilitylab.store.schema import DB_NAME, StoreError

MODE_ENV = "STABILITYLAB_STORE_MODE"  # publish | wal | auto (default)
SCRATCH_ENV = "STABILITYLAB_SCRATCH"  # where a publishing writer keeps its database (default $TMPDIR)
PUBLISH_SECONDS_ENV = "STABILITYLAB_PUBLISH_SECONDS"  # default PUBLISH_SECONDS
PUBLISH_SECONDS = 30.0
MODES = ("publish", "wal", "auto")
PUBLISH_PREFIX = f".{DB_NAME}.publish-"  # a snapshot being written; never read

# Filesystem types whose files other hosts share. fuse.* counts as network unless listed in
# LOCAL_FUSE: a wrong "network" only costs liveness of reads, a wrong "local" corrupts reads.
NETWORK_FS = frozenset({"nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "glusterfs",
                        "afs", "panfs", "wekafs", "orangefs", "pvfs2", "9p", "ncpfs", "ocfs2", "gfs2", "virtiofs"})
LOCAL_FUSE = frozenset({"fuse.lxcfs", "fuse.gvfsd-fuse", "fuse.fuse-overlayfs", "fuse.portal", "fuse.snapfuse",
                        "fuse.squashfuse", "fuse.appimagefuse"})


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) per line of /proc/<pid>/mountinfo. A line reads
    `id parent major:minor root MOUNT_POINT options [optional...] - FSTYPE source super`;
    the mount point escapes space, tab, newline and backslash as octal (\\040)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        fstype = line.split(" - ", 1)[1].split()[0]
        point = fields[4]
        for code in ("\\040", "\\011", "\\012", "\\134"):
            point = point.replace(code, chr(int(code[1:], 8)))
        mounts.append((point, fstype))
    return mounts


def filesystem_type(path: str | Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem holding `path` (or its nearest existing parent): the
    mount with the longest mount point containing it, the last one mounted on a tie."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return "unknown"  # not Linux: no mount table to read
    path = Path(os.path.realpath(path))
    best, best_type = -1, "unknown"
    for point, fstype in parse_mountinfo(mountinfo):
        inside = point == "/" or path == Path(point) or Path(point) in path.parents
        if inside and len(point) >= best:
            best, best_type = len(point), fstype
    return best_type


def is_network(fstype: str) -> bool:
    return fstype in NETWORK_FS or (fstype.startswith("fuse.") and fstype not in LOCAL_FUSE)


def store_mode(run_dir: str | Path, mountinfo: str | None = None) -> str:
    """'publish' or 'wal' for a writer of `run_dir`: STABILITYLAB_STORE_MODE forces one;
    'auto' (the default) chooses publish on a network filesystem."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise StoreError(Path(run_dir), f"{MODE_ENV}={mode!r} is not a store mode",
                         f"set {MODE_ENV} to one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "publish" if is_network(filesystem_type(run_dir, mountinfo)) else "wal"


def publish_seconds() -> float:
    value = os.environ.get(PUBLISH_SECONDS_ENV)
    try:
        return PUBLISH_SECONDS if value is None else float(value)
    except ValueError:
        raise StoreError(Path("."), f"{PUBLISH_SECONDS_ENV}={value!r} is not a number of seconds",
                         f"set {PUBLISH_SECONDS_ENV} to e.g. 30") from None


def scratch_copy(run_dir: Path) -> Path:
    """A fresh node-local path for a publishing writer's database: $STABILITYLAB_SCRATCH,
    else $TMPDIR (Slurm points it at node-local disk), else the system's temporary dir."""
    root = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"stabilitylab-{run_dir.name}-", dir=root))
    return tmp / DB_NAME


def fetch(run_dir: Path, local: Path) -> None:
    """Copy the published snapshot into the writer's local database (resume on any node:
    the published snapshot is the truth; a killed writer's scratch copy may be gone)."""
    src = sqlite3.connect(f"{(run_dir / DB_NAME).absolute().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(local)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def publish(con: sqlite3.Connection, run_dir: Path) -> None:
    """Atomically replace run_dir/run.db by a snapshot of `con`'s database: backup into a
    temporary file beside it (one read transaction of `con`, so one commit), switch it to
    rollback-journal mode (a single file any host reads), fsync, rename, fsync the directory."""
    tmp = run_dir / f"{PUBLISH_PREFIX}{secrets.token_hex(4)}"
    try:
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.backup(dst)
            dst.execute("PRAGMA journal_mode = DELETE")
        finally:
            dst.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, run_dir / DB_NAME)
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale(run_dir: Path) -> None:
    """Delete the temporary files of publishes a kill interrupted (only a run's one writer calls it)."""
    for stale in run_dir.glob(f"{PUBLISH_PREFIX}*"):
        stale.unlink(missing_ok=True)


__all__ = ["MODE_ENV", "SCRATCH_ENV", "PUBLISH_SECONDS_ENV", "PUBLISH_SECONDS", "NETWORK_FS", "parse_mountinfo",
           "filesystem_type", "is_network", "store_mode", "publish", "fetch", "scratch_copy", "remove_stale"]
