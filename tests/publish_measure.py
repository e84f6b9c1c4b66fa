"""Measurements behind docs/store.md's shared-filesystem section (run by hand, not by pytest):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python tests/publish_measure.py 30

1. the time of one publish of a 5000-step run (12 scalars, a trace and a 128-eigenvalue
   spectrum every 10 steps); 2. N kill -9s at random moments of a writer that publishes
   after every 3 steps: how many landed mid-publish (a temporary file left behind) and
   that every published run.db is a whole prefix of steps.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import test_store_publish as t  # noqa: E402

from stabilitylab.store import RunWriter  # noqa: E402
from stabilitylab.store.publish import publish  # noqa: E402

NAMES = ["loss", "lr", "grad_norm", "grad_norm/core", "tokens_per_s", "depth_n", "depth_k", "wall_time",
         "h_T_norm", "flops", "tokens", "e_norm_mean"]


def publish_cost(tmp: Path) -> str:
    os.environ.update(STABILITYLAB_STORE_MODE="publish", STABILITYLAB_PUBLISH_SECONDS="3600",
                      STABILITYLAB_SCRATCH=str(tmp / "scratch"))
    rng = np.random.default_rng(0)
    with RunWriter.create(tmp / "lab", "r", {}, experiment="e") as w:
        for step in range(1, 5001):
            w.log(step, {n: float(rng.random()) for n in NAMES})
            if step % 10 == 0:
                w.log_trace(step, {"state_norm": rng.random(8).tolist()})
                w.log_spectrum(step, rng.random(128) + 1j * rng.random(128))
        w.flush()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            publish(w._con, w.run_dir)
            times.append(time.perf_counter() - start)
        size = (w.run_dir / "run.db").stat().st_size
    return (f"run.db {size / 1e6:.1f} MB; one publish: median {statistics.median(times) * 1e3:.0f} ms, "
            f"min {min(times) * 1e3:.0f} ms (10 publishes)")


def kills(n: int) -> str:
    mid, steps = 0, []
    for seed in range(n):
        tmp, rng = Path(tempfile.mkdtemp()), random.Random(seed)
        proc = t._writer(tmp / "lab", tmp)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        mid += any((tmp / "lab" / "r").glob(f"{t.PUBLISH_PREFIX}*"))
        steps.append(t._published_prefix(tmp / "lab" / "r"))
    return (f"{n} kills, {mid} mid-publish (a temporary file left); every run.db a whole prefix, "
            f"{min(steps)}..{max(steps)} steps")


if __name__ == "__main__":
    print(publish_cost(Path(tempfile.mkdtemp())))
    print(kills(int(sys.argv[1]) if len(sys.argv) > 1 else 30))
