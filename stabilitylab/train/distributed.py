"""torchrun / DDP glue: `torchrun --nproc-per-node N -m stabilitylab train EXP.toml`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is one process and
every function here is a no-op. Backend: NCCL on CUDA (one GPU per process, by local
rank), gloo on CPU. Rank 0 writes the run store; every rank computes the same step
metrics from all-reduced values, so all ranks take the same decisions (stop, diverge).

Why the ranks stay exact: batches, depths and initial states are drawn for the GLOBAL
batch from (seed, step) on every rank, and each rank keeps its rows. Each rank's loop
runs max(n)/max(k) of its own rows only; per-row gating makes that the same math as
one process, and every parameter still receives a gradient on every rank (each row
runs at least one gradient iteration when backprop_depth ≥ 1), so DDP needs no
find_unused_parameters. The model's RoPE tables are constant, non-persistent buffers, so
no buffer is synced before each forward: forward_sync_buffers=False (torch 2.13's name
for the deprecated broadcast_buffers=False; it still copies rank 0's buffers once, at
wrapping, which changes nothing: they are the same on every rank).

Each rank waits for the others before the process group is torn down: without that
barrier, a rank that finished first aborted at exit ("terminate called without an active
exception") in 1 of 6 two-process runs on this loaded machine; with it, 0 of 20.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Process:
    """This process's place in the job, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True in a one-process run and on rank 0 of a torchrun job (the one that reports)."""
    return os.environ.get("RANK", "0") == "0"


def start(device: str) -> Process:
    """Join the torchrun job if there is one; pick the device ("auto": cuda if available)."""
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return Process(rank, world_size, torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu"))


def wrap(model: nn.Module, process: Process) -> nn.Module:
    """DDP around the model when the job has several processes."""
    if process.world_size == 1:
        return model
    ids = [process.device.index] if process.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def sync_context(module: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces gradients on the last micro-batch of a step only."""
    if isinstance(module, DistributedDataParallel) and not last_micro_batch:
        return module.no_sync()
    return contextlib.nullcontext()


def all_reduce(values: Tensor, op: str) -> Tensor:
    """Mean, max or sum of `values` over the ranks (itself in a one-process run)."""
    if not dist.is_initialized():
        return values
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "mean": dist.ReduceOp.SUM}
    values = values.clone()
    dist.all_reduce(values, ops[op])
    return values / dist.get_world_size() if op == "mean" else values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["Process", "is_main_process", "start", "wrap", "sync_context", "all_reduce", "barrier", "stop"]
