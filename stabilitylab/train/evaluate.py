"""Validation loss at several test depths, during training and from a run's checkpoint.

Evaluation is deterministic: the fixed validation batches (Corpus.val_batches), the
model in eval mode without gradients, a fixed depth T (every iteration counts, n = T,
k = 0) and an initial state drawn for each batch b from a generator seeded by
(seed, b) alone. So the same weights give the same numbers, whenever they are asked.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from stabilitylab import records
from stabilitylab.data import prepare
from stabilitylab.experiment import build_experiment
from stabilitylab.model import Depth, LoopedLM
from stabilitylab.store import RunWriter, StoreError, open_run
from stabilitylab.train import distributed
from stabilitylab.train.checkpoint import latest_checkpoint, load_checkpoint


def stream_seed(*keys: int) -> int:
    """A 63-bit generator seed from integer keys (seed, step, salt, ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def global_initial_state(model: LoopedLM, seed: int, shape: tuple[int, int], rows: slice,
                         device: torch.device) -> Tensor:
    """h_0 for rows `rows` of a global batch of `shape` (B, T): the whole batch is drawn
    from a generator seeded by `seed`, so any split over ranks sees the same rows."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return model.draw_state(shape, device, torch.float32, generator)[rows]


@torch.no_grad()
def evaluate(model: LoopedLM, batches: list[tuple[Tensor, Tensor]], depths: list[int], seed: int,
             global_batch: int, process: distributed.Process,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[int, float]:
    """Mean validation loss (nats per token) at each depth, over all ranks' shards."""
    was_training = model.training
    model.eval()
    per = global_batch // process.world_size
    rows = slice(process.rank * per, (process.rank + 1) * per)
    losses = torch.zeros(len(depths), device=process.device)
    try:
        for b, (x, y) in enumerate(batches):
            x, y = x.to(process.device), y.to(process.device)
            h0 = global_initial_state(model, stream_seed(seed, b, records.EVAL_SALT), (global_batch, x.shape[1]), rows,
                                      process.device) if model.cfg.looped else None
            for i, depth in enumerate(depths):
                with autocast():
                    losses[i] += model(x, y, depth=Depth(depth, 0), h0=h0).loss.float()
    finally:
        model.train(was_training)
    losses = distributed.all_reduce(losses / len(batches), "mean")
    return dict(zip(depths, losses.tolist()))


def eval_run(run_ref: str | Path, lab: str | Path, depths: list[int] | None = None) -> tuple[int, dict[int, float]]:
    """Evaluate the newest checkpoint of a run at `depths` (default: its train.eval_depths)
    on CPU and record the numbers in its store; returns (step, {depth: val_loss})."""
    run = open_run(run_ref, lab)
    exp = build_experiment(run.meta()["config"], source=run.path / "config.json")
    found = latest_checkpoint(run)
    if found is None:
        raise StoreError(run.path, "has no checkpoint to evaluate", "train it first (checkpoints are written "
                         "every train.checkpoint_every steps and at the end)")
    step, weights, state = found
    process = distributed.Process(0, 1, torch.device("cpu"))
    model = LoopedLM(exp.model)
    load_checkpoint(model, weights, state, process.device)
    corpus = prepare(exp.data)
    tc = exp.train
    depths = sorted(set(depths)) if depths else tc.depths(exp.model.mean_recurrence)
    batches = corpus.val_batches(tc.eval_batches, tc.batch_size, exp.data.seq_len)
    result = evaluate(model, batches, depths, tc.seed, tc.batch_size, process)
    with RunWriter.attach(run.path) as writer:
        for depth, loss in result.items():
            writer.log_eval(step, depth, {records.VAL_LOSS: loss})
    return step, result


__all__ = ["evaluate", "eval_run", "global_initial_state", "stream_seed"]
