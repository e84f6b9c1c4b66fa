"""A writer process committing every step, and a reader counting torn reads while it runs:
the live-read test of tests/test_store_faults.py, and the measurement in docs/store.md.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python tests/live_writer.py 3000

prints the torn reads out of 3000 (a third each: wide read_scalars, long Run.scalars as the
dashboard reads them, Run.summary). The writer logs every name with the value `step` at every
step, one commit each, so a read is torn exactly when it shows two commits: a NaN in a wide
row, names ending at different steps, a summary whose final loss is not its last step.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import stabilitylab
from stabilitylab.store import Run, read_scalars

NAMES = ("loss", "lr", "grad_norm", "h_T_norm", "tokens")
KINDS = ("wide", "long", "summary")
WRITER = f"""
import sys, time
from stabilitylab.store import RunWriter
with RunWriter.create(sys.argv[1], "live", {{}}, experiment="live", flush_rows=1) as w:
    for step in range(1, 10**9):
        w.log(step, dict.fromkeys({NAMES!r}, float(step)))  # flush_rows=1: one commit per step
        time.sleep(0.001)  # ~1000 commits/s: the run stays small enough to read thousands of times
"""


def start_writer(lab: Path) -> tuple[subprocess.Popen, Path]:
    """The writer process (it writes until killed) and its run directory, once it exists."""
    root = str(Path(stabilitylab.__file__).resolve().parents[1])
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(lab)],
                              env={"PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not (lab / "live" / "run.db").exists():
        if writer.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the writer process did not create its run (exit {writer.poll()})")
        time.sleep(0.01)
    return writer, lab / "live"


def torn(run: Run, kind: str, start: int) -> tuple[bool, int]:
    """(is this read torn, the last step it saw). Reads only steps ≥ start (fast, and the
    newest rows are where a torn read shows)."""
    if kind == "wide":
        table = read_scalars([run], NAMES, start=start, wide=True)
        if table.empty:
            return False, start
        values = table.reindex(columns=list(NAMES)).to_numpy(dtype=float)
        return bool(np.any(values != table["step"].to_numpy()[:, None])), int(table["step"].max())
    if kind == "long":
        table = run.scalars(NAMES, start=start)
        if table.empty:
            return False, start
        last = table.groupby("name")["step"].max()
        return len(last) != len(NAMES) or last.nunique() != 1, int(last.max())
    summary = run.summary()
    last = summary["last_step"]
    if last is None:
        return False, start
    return not summary["final_loss"] == summary["max_state_norm"] == last, int(last)


def count_torn_reads(lab: Path, reads: int) -> dict[str, int]:
    """Start a writer, read `reads` times while it writes (wide, long, summary in turn),
    stop it; the torn reads per kind, and the steps the writer had committed."""
    writer, run_dir = start_writer(lab)
    counts = dict.fromkeys(KINDS, 0)
    try:
        run, last = Run(run_dir, "live"), 0
        for i in range(reads):
            bad, last = torn(run, KINDS[i % 3], max(0, last - 20))
            counts[KINDS[i % 3]] += bad
        if writer.poll() is not None:
            raise RuntimeError(f"the writer stopped early (exit {writer.returncode}): the reads were not live")
    finally:
        writer.kill()
        writer.wait()
    return {**counts, "reads": reads, "steps": last}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        print(count_torn_reads(Path(tmp), int(sys.argv[1]) if len(sys.argv) > 1 else 3000),
              f"{time.perf_counter() - t0:.1f} s")
