"""Sweeps on Slurm: the cells of a sweep as one submitit job array, every cell resumable.

    stabilitylab sweep EXP --launcher submitit --slurm-partition gpu --slurm-gpus-per-node 1 \\
        --array-parallelism 8 --lab /shared/lab

submitit (an optional extra: pip install submitit==1.5.4) pickles one `CellJob` per cell
and submits them as a single `sbatch --array` job. Each array task trains its cell with
the trainer's resume rule (sweep.py): absent → trained, interrupted → resumed from its
newest checkpoint, finished → skipped.

Preemption and timeouts. Slurm signals a job (USR2, `signal_delay_s` before its time
limit, or on preemption); submitit then calls CellJob.checkpoint, which returns the same
call (the state lives in the run's own checkpoints, not in the pickle), and requeues the
task. The interrupted run is marked failed in its store (the SystemExit escapes the
trainer), and the requeued task resumes it from its newest checkpoint, bit-exactly: the
steps after that checkpoint are trained again with the same (seed, step) batches and
depths. Work since the last checkpoint is lost, so train.checkpoint_every bounds it.

Threads: a task uses the cores of its CPU affinity (what Slurm granted it), unless the
CellJob says otherwise (the local executor runs every cell of an array at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stabilitylab.config import ConfigError
from stabilitylab.experiment import Cell
from stabilitylab.train.sweep import CellResult, _run_cell, _state, cpu_cores, plan_sweep

MAX_REQUEUES = 20  # timeouts a cell may take before submitit gives up (preemptions are not counted)
SIGNAL_DELAY_S = 120  # USR2 this long before the time limit: time to leave the step being trained


@dataclass(frozen=True)
class CellJob:
    """One array task: train (or resume, or skip) one cell. Checkpointable for submitit."""

    lab: str
    source: str  # the experiment file (locates config errors)
    threads: int = 0  # 0: the cores of this task's affinity

    def __call__(self, cell: Cell, run_id: str) -> CellResult:
        state = _state(Path(self.lab) / run_id)
        if state in ("finished", "diverged", "alive"):
            return CellResult(run_id, "skipped", "running" if state == "alive" else state)
        torch.set_num_threads(self.threads or cpu_cores())
        return _run_cell(cell, run_id, state != "absent", self.lab, self.source, 0, False, print)

    def checkpoint(self, cell: Cell, run_id: str):
        """Requeue the same call: resuming is the trainer's job, from the run's checkpoints."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, cell, run_id)


def slurm_executor(folder: str | Path, partition: str | None = None, gpus_per_node: int | None = None,
                   array_parallelism: int | None = None, timeout_min: int = 240, cpus_per_task: int | None = None):
    """A submitit executor for Slurm; refused (one line, with the fix) where there is no Slurm."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher", "submitit is not installed",
                          "pip install submitit==1.5.4 (the optional Slurm extra), or use --launcher local") from None
    if submitit.AutoExecutor.which() != "slurm":
        raise ConfigError("--launcher", "submitit finds no Slurm on this machine (no sbatch on PATH)",
                          "Run the sweep on the cluster's login node, or use --launcher local")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_REQUEUES)
    params = {"timeout_min": timeout_min, "slurm_partition": partition, "gpus_per_node": gpus_per_node,
              "slurm_array_parallelism": array_parallelism, "cpus_per_task": cpus_per_task,
              "slurm_signal_delay_s": SIGNAL_DELAY_S}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def submit_sweep(path: str | Path, sets: list[str] | tuple[str, ...], lab: str | Path, executor,
                 threads: int = 0, report=print) -> tuple[list[CellResult], list]:
    """Submit the cells of the sweep that are not done as one job array of `executor`;
    return (results of the skipped cells, the submitit jobs, one per submitted cell)."""
    skipped, plan = plan_sweep(path, sets, lab, report)
    if not plan:
        return skipped, []
    job = CellJob(str(lab), str(path), threads)
    jobs = executor.map_array(job, [cell for cell, _, _ in plan], [run_id for _, run_id, _ in plan])
    for (_, run_id, resume), j in zip(plan, jobs):
        report(f"{run_id}: submitted as job {j.job_id}{' (resumes)' if resume else ''}")
    return skipped, jobs


__all__ = ["CellJob", "slurm_executor", "submit_sweep", "MAX_REQUEUES"]
