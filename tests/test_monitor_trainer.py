"""The lab's trainer as a user of LoopMonitor: its every-step radius estimate and
contraction rate change no number of training, and a resumed run keeps the estimate's
warm subspace (the same estimates as the uninterrupted run)."""

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from stabilitylab import records
from stabilitylab.config import ConfigError
from stabilitylab.experiment import load_experiment
from stabilitylab.store import open_run
from stabilitylab.train.trainer import train

from test_train import train_killed_at_step_5

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = Path(__file__).resolve().parents[1] / "experiments" / "tiny.toml"
EVERY_STEP = ("probes.radius_every=1", "probes.rate_every=1")


def tiny(cache, *sets):
    return load_experiment(TINY, [f"data.cache_dir={cache}", "train.eval_every=0", *sets])


def scalars(lab, run_id, names):
    return open_run(run_id, lab).scalars(names).pivot(index="step", columns="name", values="value")


def test_the_every_step_instruments_leave_the_training_curve_bit_for_bit_the_same(tmp_path, corpus_cache):
    train(tiny(corpus_cache, *EVERY_STEP), tmp_path, "on", progress=False)
    train(tiny(corpus_cache), tmp_path, "off", progress=False)
    curve = [records.LOSS, records.GRAD_NORM, records.STATE_NORM, records.STATE_NORM_MEAN]
    assert scalars(tmp_path, "on", curve).equals(scalars(tmp_path, "off", curve))
    assert open_run("on", tmp_path).evals().equals(open_run("off", tmp_path).evals())
    on = scalars(tmp_path, "on", [records.RADIUS_ESTIMATE, records.CONTRACTION_RATE])
    assert len(on) == 6 and on.notna().all().all() and (on > 0).all().all()
    assert not scalars(tmp_path, "off", [records.RADIUS_ESTIMATE, records.CONTRACTION_RATE]).size


def test_a_resumed_run_continues_the_radius_estimate_of_the_uninterrupted_one(tmp_path, corpus_cache,
                                                                             monkeypatch):
    """The tracker's subspace is checkpointed: killed at step 5 and resumed from the step-3
    checkpoint, the run records the uninterrupted run's estimates bit for bit."""
    exp = tiny(corpus_cache, *EVERY_STEP, "train.checkpoint_every=3")
    assert train(exp, tmp_path, "whole", progress=False) == "finished"
    train_killed_at_step_5(exp, tmp_path, "resumed", monkeypatch)
    assert train(exp, tmp_path, "resumed", resume=True, progress=False) == "finished"
    names = [records.LOSS, records.RADIUS_ESTIMATE, records.CONTRACTION_RATE]
    whole, resumed = scalars(tmp_path, "whole", names), scalars(tmp_path, "resumed", names)
    assert len(whole) == 6
    pd.testing.assert_frame_equal(whole, resumed, check_exact=True)


def test_a_run_recorded_before_the_every_step_probes_existed_still_resumes(tmp_path, corpus_cache, monkeypatch):
    """Its stored config lacks probes.radius_every / rate_every: at their defaults (0) it is the same config."""
    import json
    import sqlite3

    exp = tiny(corpus_cache, "train.checkpoint_every=3")
    train_killed_at_step_5(exp, tmp_path, "old", monkeypatch)
    with sqlite3.connect(tmp_path / "old" / "run.db") as con:
        config = json.loads(con.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
        del config["probes"]["radius_every"], config["probes"]["rate_every"]
        con.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(config),))
    con.close()
    assert train(exp, tmp_path, "old", resume=True, progress=False) == "finished"


def test_the_radius_under_fsdp_is_refused_before_anything_is_written(tmp_path, corpus_cache, monkeypatch):
    from stabilitylab.train import distributed

    start = distributed.start
    monkeypatch.setattr(distributed, "start", lambda device: replace(start(device), world_size=2))
    with pytest.raises(ConfigError, match="radius_every"):
        train(tiny(corpus_cache, "probes.radius_every=1", "train.parallel=fsdp", "train.batch_size=4"), tmp_path,
              "fsdp", progress=False)
    assert not (tmp_path / "fsdp").exists()


def test_under_ddp_rank_0_records_the_estimates_of_the_one_process_run(tmp_path, corpus_cache):
    """Two data-parallel processes (torchrun, gloo): rank 0 measures on its own first sequence,
    the global batch's first, so it records the one-process run's radius (to the all-reduce's
    rounding), and no rank hangs on it. The contraction rate is that of rank 0's rows (the
    trace averages over the rows a forward ran), so it differs from the whole batch's."""
    import subprocess
    import sys

    import numpy as np

    repo = Path(__file__).resolve().parents[1]
    sets = [f"data.cache_dir={corpus_cache}", "train.steps=3", "train.eval_every=0", *EVERY_STEP]
    train(load_experiment(TINY, sets), tmp_path, "one", progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "stabilitylab", "train", str(TINY), *[a for s in sets for a in ("--set", s)],
               "--lab", str(tmp_path), "--run-id", "two", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    names = [records.LOSS, records.RADIUS_ESTIMATE, records.CONTRACTION_RATE]
    one, two = scalars(tmp_path, "one", names), scalars(tmp_path, "two", names)
    assert len(two) == 3 and two.notna().all().all()
    same = [records.LOSS, records.RADIUS_ESTIMATE]
    np.testing.assert_allclose(two[same].to_numpy(), one[same].to_numpy(), rtol=1e-4)
