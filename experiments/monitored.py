"""Train an experiment's cells in a plain PyTorch loop with LoopMonitor attached.

    python experiments/monitored.py experiments/warnings/c2_late_divergence.toml --lab runs [--set k=v ...]

The loop is the trainer's step (train/trainer.py: the same batches, depths, h_0, AdamW /
Muon groups, schedule and clipping, single process, no grad accumulation), written out
as a user would write it, with the radius estimate every step (as the warning benchmark
was recorded). The trainer with probes.radius_every = 1 and probes.rate_every = 1
records the same numbers bit for bit (tests/test_monitor.py). Each cell is the run
lab/<experiment>/<cell id>; a cell already in the lab is skipped. The experiment's
[divergence] action decides what a divergence does: "record" trains on to the last step,
"stop" ends the run there, as diverged (a user's loop breaking on `.stop`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from stabilitylab import records
from stabilitylab.data import prepare
from stabilitylab.experiment import read_experiment, sweep_cells
from stabilitylab.model import LoopedLM, sample_depth
from stabilitylab.monitor import LoopMonitor, MonitorConfig
from stabilitylab.train.evaluate import global_initial_state, stream_seed
from stabilitylab.train.optim import build_optimizers, lr_factor, parameter_roles, set_lr
from stabilitylab.train.probes import grad_norms
from stabilitylab.train.trainer import H0_SALT


def train_monitored(exp, lab: str | Path, run_id: str, monitor_config: MonitorConfig = MonitorConfig(radius_every=1),
                    monitor: bool = True) -> str | None:
    """One run of `exp` (an ExperimentConfig) with the monitor recording it into lab/run_id
    (monitor=False: the same loop without it, for the overhead benchmark). Returns the run's
    final status, or None without a monitor."""
    tc, cfg, seq_len = exp.train, exp.model, exp.data.seq_len
    corpus = prepare(exp.data)
    torch.manual_seed(tc.seed)
    model = LoopedLM(cfg)
    optimizers = build_optimizers(model, tc)
    roles = parameter_roles(model)
    config = MonitorConfig(**{**monitor_config.__dict__, "divergence": exp.divergence})
    watch = (LoopMonitor(model, lab, run_id, config=config, run_config=exp.to_dict(), experiment=exp.name,
                         seed=tc.seed) if monitor else None)
    B = tc.batch_size
    try:
        for step in range(1, tc.steps + 1):
            t0 = time.perf_counter()
            factor = lr_factor(step, tc)
            set_lr(optimizers, factor)
            x, y = corpus.get_batch("train", step, B, seq_len, tc.seed)
            depth = sample_depth(cfg, step, tc.seed, B, seq_len)
            h0 = global_initial_state(model, stream_seed(tc.seed, step, H0_SALT), (B, seq_len), slice(None),
                                      torch.device("cpu"))
            out = model(x, y, depth=depth, h0=h0, trace=True)
            out.loss.backward()
            total = torch.nn.utils.get_total_norm(list(grad_norms(roles, x.device).values()))  # the trainer's ‖∇‖
            if tc.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), tc.grad_clip, total)
            for opt in optimizers:
                opt.step()
            verdict = watch and watch.step(
                step, loss=out.loss, model=model, tokens=x, state=out.state, trace=out.trace,
                **{records.GRAD_NORM: float(total), records.LR: tc.lr * factor,
                   records.TOKENS_PER_S: B * seq_len / (time.perf_counter() - t0)})
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if verdict and verdict.stop:
                break
    except BaseException as err:
        if watch:
            watch.close(err)
        raise
    if watch:
        watch.close()
        return watch_status(lab, run_id)
    return None


def watch_status(lab: str | Path, run_id: str) -> str:
    from stabilitylab.store import open_run

    return open_run(run_id, lab).status()["status"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment")
    p.add_argument("--lab", default="runs")
    p.add_argument("--set", action="append", default=[], dest="sets")
    args = p.parse_args(argv)
    raw = read_experiment(args.experiment, args.sets)
    for cell in sweep_cells(raw, args.experiment):
        run_id = f"{cell.config.name}/{cell.id}" if cell.id else cell.config.name
        if (Path(args.lab) / run_id).exists():
            print(f"{run_id}: skipped (in the lab)")
            continue
        t0 = time.perf_counter()
        status = train_monitored(cell.config, args.lab, run_id)
        print(f"{run_id}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
