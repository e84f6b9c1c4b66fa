"""FSDP2 (train.parallel = "fsdp") on 2 CPU ranks (gloo): the losses, gradients and probes of
one process, and checkpoints that cross between FSDP and one process.

Tolerances: float32 FSDP against one process, rtol 1e-5 (the ranks' reductions sum in
another order; measured: 1.7e-7 at most over 4 steps, DDP 1.2e-7). bfloat16 parameters (param_dtype) against
float32, rtol 2e-2 on the loss (bfloat16 keeps 8 bits of mantissa: 4e-3 per rounding).
DDP against one process is tests/test_distributed.py, at the same rtol 1e-5."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stabilitylab.experiment import load_experiment
from stabilitylab.store import RunWriter, open_run
from stabilitylab.train.trainer import train

from conftest import threads

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.toml"
NAMES = ["loss", "grad_norm", "grad_norm/core", "h_T_norm", "flops"]


def settings(cache) -> list[str]:
    return [f"data.cache_dir={cache}", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=2",
            "train.keep_checkpoints=0", "train.parallel=fsdp", "probes.trace_every=2", "probes.spectrum_every=2"]


def torchrun(lab, run_id, sets, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "stabilitylab", "train", str(TINY), *[a for s in sets for a in ("--set", s)],
               "--lab", str(lab), "--run-id", run_id, "--no-progress", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]


def scalars(run):
    return run.scalars(NAMES).sort_values(["name", "step"]).reset_index(drop=True)


def cut_after(run_dir: Path, step: int, last: int) -> None:
    """Make a finished run read as killed after `step`: its later checkpoint leaves the index."""
    with pytest.raises(RuntimeError), RunWriter.resume(run_dir, step) as writer:
        writer.remove_checkpoint(last)
        raise RuntimeError("killed")


@pytest.fixture(scope="module")
def one(tmp_path_factory, corpus_cache):
    lab = tmp_path_factory.mktemp("fsdp-lab")
    with threads(1):
        train(load_experiment(TINY, settings(corpus_cache)), lab, "one", progress=False)
    run = open_run("one", lab)
    return lab, scalars(run), run.evals(), run.spectra()


def test_fsdp_trains_the_losses_and_probes_of_one_process_and_its_checkpoint_resumes_in_one(one, corpus_cache):
    lab, a, evals, spectra = one
    torchrun(lab, "fsdp", settings(corpus_cache))
    run = open_run("fsdp", lab)
    b = scalars(run)
    assert a[["step", "name"]].values.tolist() == b[["step", "name"]].values.tolist()
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-5)
    np.testing.assert_allclose(run.evals()["value"], evals["value"], rtol=1e-5)
    # the probes saw the whole Ā, not a rank's shard: every eigenvalue, the same ones
    mine = run.spectra()
    assert len(mine) == len(spectra) > 0
    np.testing.assert_allclose(np.concatenate(mine["eigenvalues"].tolist()),
                               np.concatenate(spectra["eigenvalues"].tolist()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mine[["rho", "norm_a", "norm_b", "norm_c"]], spectra[["rho", "norm_a", "norm_b", "norm_c"]],
                               rtol=1e-5)
    assert len(mine["eigenvalues"][0]) == load_experiment(TINY, settings(corpus_cache)).model.state_dim

    # FSDP → one process: the FSDP checkpoint of step 2 resumes here, with the same steps 3-4
    cut_after(lab / "fsdp", 2, 4)
    with threads(1):
        train(load_experiment(TINY, settings(corpus_cache)[:-3]), lab, "fsdp", resume=True, progress=False)
    np.testing.assert_allclose(scalars(open_run("fsdp", lab))["value"], a["value"], rtol=1e-5)


def test_a_one_process_checkpoint_resumes_under_fsdp_in_bfloat16(one, corpus_cache, tmp_path):
    lab, a, _, _ = one
    import shutil

    shutil.copytree(lab / "one", tmp_path / "one")
    cut_after(tmp_path / "one", 2, 4)
    torchrun(tmp_path, "one", settings(corpus_cache), "--resume", "--set", "train.param_dtype=bfloat16")
    run = open_run("one", tmp_path)
    b = scalars(run)
    assert run.summary()["status"] == "finished" and b["step"].max() == 4
    early, late = b["step"] <= 2, b["step"] > 2
    np.testing.assert_array_equal(b[early]["value"], a[early]["value"])  # kept from the one-process run
    loss = (b["name"] == "loss") & late
    np.testing.assert_allclose(b[loss]["value"], a[loss]["value"], rtol=2e-2)


def test_activation_checkpointing_changes_no_number(tmp_path, corpus_cache):
    sets = [f"data.cache_dir={corpus_cache}", "train.steps=2", "train.eval_every=2"]
    with threads(1):
        train(load_experiment(TINY, sets), tmp_path, "plain", progress=False)
        train(load_experiment(TINY, sets + ["train.activation_checkpointing=true"]), tmp_path, "ac",
              progress=False)
    a, b = (scalars(open_run(r, tmp_path)) for r in ("plain", "ac"))
    np.testing.assert_array_equal(a["value"], b["value"])
