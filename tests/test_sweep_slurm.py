"""Sweeps past one process: the local scheduler (longest cell first, threads from the cores) and
the submitit job array (stabilitylab/train/slurm.py) run through submitit's LocalExecutor,
with one cell signalled mid-run (as Slurm preempts) and requeued."""

import os
import signal
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from stabilitylab.cli import main
from stabilitylab.store import open_run
from stabilitylab.train import sweep
from stabilitylab.train.sweep import run_sweep

from conftest import threads

TINY = Path(__file__).resolve().parents[1] / "experiments" / "tiny.toml"


def grid(tmp_path, values: str, key="model.injection", steps=2) -> Path:
    text = TINY.read_text().replace('name = "tiny"', 'name = "grid"').replace("steps = 6", f"steps = {steps}")
    path = tmp_path / "grid.toml"
    path.write_text(text + f'\n[sweep.grid]\n"{key}" = {values}\n')
    return path


class InlinePool:
    """A ProcessPoolExecutor stand-in that runs each submission at once, in this process."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future


def test_the_local_scheduler_starts_the_longest_cell_first_and_gives_the_tail_the_freed_cores(
        tmp_path, monkeypatch, corpus_cache):
    started = []
    monkeypatch.setattr(sweep, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(sweep, "cpu_cores", lambda: 2)
    monkeypatch.setattr(sweep, "_run_cell", lambda cell, run_id, resume, lab, src, threads, progress, report:
                        started.append((run_id, threads)) or sweep.CellResult(run_id, "trained", "finished"))
    path = grid(tmp_path, "[2, 8, 4]", key="train.steps")
    results = run_sweep(path, ["data.cache_dir=" + str(corpus_cache)], tmp_path / "lab", jobs=2, report=lambda s: 0)
    assert started == [("grid/steps=8", 1), ("grid/steps=4", 1), ("grid/steps=2", 2)]
    assert [r.run_id for r in results] == ["grid/steps=2", "grid/steps=8", "grid/steps=4"]  # the grid's order


def worker_of(controller_pid: int, timeout: float = 60) -> int:
    """The pid of the task process that submitit's local controller started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == controller_pid:
                    return int(entry)
        time.sleep(0.05)
    raise TimeoutError("submitit's controller started no task")


CELLS = ["grid/injection=parcae", "grid/injection=free-diagonal"]


def slurm_settings(cache) -> list[str]:
    return [f"data.cache_dir={cache}", "train.checkpoint_every=4", "train.eval_every=12", "probes.trace_every=0",
            "probes.spectrum_every=0"]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, corpus_cache):
    """The reference: both cells trained by `--launcher local`, one thread."""
    root = tmp_path_factory.mktemp("local-sweep")
    path = grid(root, '["parcae", "free-diagonal"]', steps=24)
    with threads(1):
        run_sweep(path, slurm_settings(corpus_cache), root / "lab", report=lambda s: 0, progress=False)
    return root / "lab"


def wait_for_checkpoint(lab: Path, cell: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ((lab / cell / "run.db").is_file() and len(open_run(cell, lab).checkpoints())):
        assert time.monotonic() < deadline, f"{cell} wrote no checkpoint"
        time.sleep(0.02)


def assert_same_runs(lab: Path, reference: Path, cells: list[str]) -> None:
    for cell in cells:
        a, b = (open_run(cell, where).scalars(["loss", "grad_norm"]).sort_values(["name", "step"])
                for where in (reference, lab))
        assert a[["step", "name"]].values.tolist() == b[["step", "name"]].values.tolist()
        np.testing.assert_array_equal(b["value"], a["value"])  # bit-exact, resume included
        np.testing.assert_array_equal(open_run(cell, lab).evals()["value"], open_run(cell, reference).evals()["value"])


def test_a_submitit_job_array_with_a_preempted_cell_equals_the_local_sweep(tmp_path, corpus_cache, local_sweep):
    submitit = pytest.importorskip("submitit")
    from stabilitylab.train.slurm import submit_sweep

    path, sets, lab = grid(tmp_path, '["parcae", "free-diagonal"]', steps=24), slurm_settings(corpus_cache), tmp_path / "lab"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    skipped, jobs = submit_sweep(path, sets, lab, executor, threads=1, report=lambda s: 0)
    assert skipped == [] and len(jobs) == 2

    # preempt the second cell once it has a checkpoint: Slurm's USR2, straight to its task
    pid = worker_of(jobs[1]._process.pid)
    wait_for_checkpoint(lab, CELLS[1])
    os.kill(pid, signal.SIGUSR2)
    results = [job.result() for job in jobs]
    assert [(r.run_id, r.action, r.status) for r in results] == [(CELLS[0], "trained", "finished"),
                                                                 (CELLS[1], "resumed", "finished")]
    history = open_run(CELLS[1], lab).status_history()["status"].tolist()
    assert "failed" in history and history[-1] == "finished"  # interrupted, requeued, resumed
    assert_same_runs(lab, local_sweep, CELLS)
    assert submit_sweep(path, sets, lab, executor, report=lambda s: 0)[1] == []  # all done: nothing submitted


def test_a_killed_cell_is_resumed_when_the_sweep_is_submitted_again(tmp_path, corpus_cache, local_sweep):
    """SIGKILL (a lost node) is not requeued by submitit; submitting the sweep again resumes the cell."""
    submitit = pytest.importorskip("submitit")
    from stabilitylab.train.slurm import submit_sweep

    path, sets, lab = grid(tmp_path, '["parcae"]', steps=24), slurm_settings(corpus_cache), tmp_path / "lab"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    (job,) = submit_sweep(path, sets, lab, executor, threads=1, report=lambda s: 0)[1]
    pid = worker_of(job._process.pid)
    wait_for_checkpoint(lab, CELLS[0])
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(Exception, match="INTERRUPTED|output"):
        job.result()
    run = open_run(CELLS[0], lab)
    assert run.status()["status"] == "running" and not run.alive()  # no writer: the sweep reads it as interrupted

    (again,) = submit_sweep(path, sets, lab, executor, threads=1, report=lambda s: 0)[1]
    assert again.result().action == "resumed"
    assert_same_runs(lab, local_sweep, CELLS[:1])


def test_the_submitit_launcher_without_slurm_is_refused_with_the_fix(tmp_path, corpus_cache, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    path = grid(tmp_path, '["parcae"]')
    assert main(["sweep", str(path), "--launcher", "submitit", "--slurm-partition", "gpu",
                 "--lab", str(tmp_path / "lab")]) == 2
    err = capsys.readouterr().err
    assert "--launcher: submitit finds no Slurm on this machine" in err and "--launcher local" in err


def test_the_cli_submits_one_slurm_array_with_the_requested_resources(tmp_path, corpus_cache, capsys, monkeypatch):
    """Up to sbatch: a stand-in sbatch records the script submitit wrote (srun only has to exist)."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    path = grid(tmp_path, '["parcae", "free-diagonal", "concat"]')
    lab = tmp_path / "lab"
    assert main(["sweep", str(path), "--set", f"data.cache_dir={corpus_cache}", "--launcher", "submitit",
                 "--slurm-partition", "gpu", "--slurm-gpus-per-node", "1", "--array-parallelism", "2",
                 "--timeout-min", "90", "--lab", str(lab)]) == 0
    out = capsys.readouterr().out
    assert "grid/injection=concat: submitted as job 4242_2" in out and "3 cells submitted, 0 skipped" in out
    script = (tmp_path / "submitted.sh").read_text()
    for directive in ("--array=0-2%2", "--partition=gpu", "--gpus-per-node=1", "--time=90", "--signal=USR2@120"):
        assert f"#SBATCH {directive}" in script, directive
    assert "submitit.core._submit" in script and str(lab / ".submitit") in script
