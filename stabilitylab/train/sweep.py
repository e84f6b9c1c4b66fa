"""Sweeps: every cell of an experiment's grid × seeds, resumable, optionally in parallel.

Each cell is the run lab/<experiment>/<cell id>. Running a sweep again:

    finished or diverged   skipped (a diverged run is a result)
    running, writer alive  skipped (another process is training it)
    failed, or running with no live writer (killed, crashed, interrupted)
                           resumed from its newest checkpoint (from scratch if none)
    absent                 trained

With jobs > 1 the cells run in that many worker processes (spawned), longest first
(estimated cost = training FLOPs per token × tokens, config/sizes.py): the classic
longest-processing-time rule, so the tail of a sweep holds its shortest cells and no worker
idles long while another finishes a big one. Each cell gets cores // min(jobs, cells left)
torch threads when it starts (cores: this process's CPU affinity), so the jobs share the
cores instead of fighting over them, and the last cells of a sweep get the cores the
finished ones freed.

On a Slurm cluster, stabilitylab/train/slurm.py submits the same cells as a job array.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from stabilitylab.config import training_flops_per_token
from stabilitylab.experiment import Cell, read_experiment, sweep_cells
from stabilitylab.store import DB_NAME, Run


@dataclass(frozen=True)
class CellResult:
    run_id: str
    action: str  # trained, resumed, skipped
    status: str  # finished, diverged, running (elsewhere), failed
    detail: str = ""


def run_sweep(path: str | Path, sets: list[str] | tuple[str, ...] = (), lab: str | Path = "runs", jobs: int = 1,
              progress: bool = True, report=print) -> list[CellResult]:
    """Train every cell of the experiment at `path` that is not done; return one result per
    cell, in the grid's order."""
    results, plan = plan_sweep(path, sets, lab, report)
    if jobs == 1 or len(plan) <= 1:
        return results + [_run_cell(cell, run_id, resume, str(lab), str(path), 0, progress, report)
                          for cell, run_id, resume in plan]
    done: dict[str, CellResult] = {}
    pending, running, cores = sorted(plan, key=lambda item: -cell_cost(item[0])), {}, cpu_cores()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            while pending and len(running) < jobs:
                threads = max(1, cores // min(jobs, len(pending) + len(running)))
                cell, run_id, resume = pending.pop(0)
                running[pool.submit(_run_cell, cell, run_id, resume, str(lab), str(path), threads, False,
                                    None)] = run_id
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                result = done[running.pop(future)] = future.result()
                report(_line(result))
    return results + [done[run_id] for _, run_id, _ in plan]


def plan_sweep(path: str | Path, sets: list[str] | tuple[str, ...], lab: str | Path,
               report=print) -> tuple[list[CellResult], list[tuple[Cell, str, bool]]]:
    """(results of the cells skipped, [(cell, run id, resume)] of the cells to train)."""
    cells = sweep_cells(read_experiment(path, sets), path, sets)
    plan, results = [], []
    for cell in cells:
        run_id = f"{cell.config.name}/{cell.id}" if cell.id else cell.config.name
        state = _state(Path(lab) / run_id)
        if state in ("finished", "diverged", "alive"):
            results.append(CellResult(run_id, "skipped", "running" if state == "alive" else state))
            report(f"{run_id}: skipped ({'another process is training it' if state == 'alive' else state})")
        else:
            plan.append((cell, run_id, state != "absent"))
    return results, plan


def cell_cost(cell: Cell) -> float:
    """Training FLOPs of the whole cell at its nominal depths (the scheduler's estimate)."""
    exp = cell.config
    tokens = exp.train.steps * exp.train.batch_size * exp.data.seq_len
    return training_flops_per_token(exp.model, exp.data.seq_len).total * tokens


def cpu_cores() -> int:
    """The cores this process may run on (its affinity: what Slurm or taskset granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def _state(run_dir: Path) -> str:
    """absent | finished | diverged | alive | interrupted (failed, or running without a writer)."""
    if not (run_dir / DB_NAME).is_file():
        return "absent"
    status = Run(run_dir).status()
    if status["status"] == "running":
        return "alive" if status["alive"] else "interrupted"
    return "interrupted" if status["status"] == "failed" else status["status"]


def _run_cell(cell: Cell, run_id: str, resume: bool, lab: str, source: str, threads: int, progress: bool,
              report) -> CellResult:
    """Train one cell; a failure is reported as a result (the run store marks it failed)."""
    from stabilitylab.train.trainer import train

    if threads:
        torch.set_num_threads(threads)
    try:
        status = train(cell.config, lab, run_id, resume=resume, sweep_cell=cell.id or None, source=source,
                       progress=progress)
        result = CellResult(run_id, "resumed" if resume else "trained", status)
    except Exception as err:  # noqa: BLE001 - one failed cell must not stop the sweep
        result = CellResult(run_id, "resumed" if resume else "trained", "failed", f"{type(err).__name__}: {err}")
    if report:
        report(_line(result))
    return result


def _line(result: CellResult) -> str:
    detail = f": {result.detail}" if result.detail else ""
    return f"{result.run_id}: {result.action}, {result.status}{detail}"


__all__ = ["CellResult", "run_sweep", "plan_sweep", "cell_cost", "cpu_cores"]
