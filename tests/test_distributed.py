"""torchrun: two data-parallel processes (gloo, CPU) train the losses of one process with
the same global batch, though each rank's loop runs only its own rows' depths."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from stabilitylab.experiment import load_experiment
from stabilitylab.model import sample_depth
from stabilitylab.store import open_run
from stabilitylab.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.toml"


def test_two_processes_train_the_losses_of_one(tmp_path, corpus_cache):
    sets = [f"data.cache_dir={corpus_cache}", "train.steps=3", "train.eval_every=3"]
    exp = load_experiment(TINY, sets)
    tc = exp.train
    maxima = [[sample_depth(exp.model, s, tc.seed, tc.batch_size, exp.data.seq_len).n[rows].max().item()
               for rows in (slice(0, 2), slice(2, 4))] for s in range(1, 4)]
    assert any(a != b for a, b in maxima)  # the ranks' loops run different numbers of iterations

    train(exp, tmp_path, "one", progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "stabilitylab", "train", str(TINY), *[a for s in sets for a in ("--set", s)],
               "--lab", str(tmp_path), "--run-id", "two", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [r[:2] for r in rows if r and r[0] == "two"] == [["two", "finished"]]  # rank 0 reports, once

    one, two = open_run("one", tmp_path), open_run("two", tmp_path)
    names = ["loss", "grad_norm", "h_T_norm", "h_T_norm_mean", "tokens", "flops"]
    a, b = (run.scalars(names).sort_values(["name", "step"]) for run in (one, two))
    assert a[["step", "name"]].values.tolist() == b[["step", "name"]].values.tolist()
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-5)
    np.testing.assert_allclose(two.evals()["value"], one.evals()["value"], rtol=1e-5)
    assert two.summary()["status"] == "finished" and len(two.checkpoints()) == 2
