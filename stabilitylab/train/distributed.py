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

FSDP2 (train.parallel = "fsdp"): `fully_shard` splits every parameter, gradient and
optimiser state over the ranks (each holds 1/W; AdamW's two moments are most of a
run's memory). Units: each prelude and coda block, which run once per forward, and the
root, which holds the rest, the core included. The loop calls the core blocks many
times per forward; as part of the root they are gathered once at the start of the
forward and stay gathered through the backward (FSDP2 keeps the root unsharded after
forward), so the loop runs no collective, and the ranks' different loop depths cannot
misalign one. Mixed precision: parameters gathered and computed in param_dtype (auto:
bfloat16 on CUDA, float32 on CPU, where gloo also takes bfloat16), gradients reduced in
float32, the sharded master weights float32. Checkpoints and probes use the FULL weights
and optimiser state (full_state, full_optimizer_states: collectives, rank 0 receives), in
the one-process format, so a checkpoint crosses between FSDP, DDP and one process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
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


def wrap(model: nn.Module, process: Process, parallel: str = "ddp", param_dtype: str = "auto") -> nn.Module:
    """DDP around the model, or FSDP2 applied to it in place, when the job has several processes."""
    if process.world_size == 1:
        return model
    if parallel == "fsdp":
        return shard(model, process, param_dtype)
    ids = [process.device.index] if process.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def shard(model: nn.Module, process: Process, param_dtype: str = "auto") -> nn.Module:
    """fully_shard the prelude and coda blocks, then the root (see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if param_dtype == "auto":
        param_dtype = "bfloat16" if process.device.type == "cuda" else "float32"
    dtype = None if param_dtype == "float32" else getattr(torch, param_dtype)  # None: compute in the stored float32
    # FSDP's own input cast rebuilds dataclass arguments (Depth has init=False fields): cast h0 here instead
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in (*model.prelude, *model.coda):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if dtype is not None:
        def cast_h0(module, args, kwargs):
            if kwargs.get("h0") is not None:
                kwargs["h0"] = kwargs["h0"].to(dtype)
            return args, kwargs

        model.register_forward_pre_hook(cast_h0, with_kwargs=True)
    return model


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def sync_context(module: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces (FSDP reduce-scatters) gradients on the last micro-batch of a step only."""
    if isinstance(module, DistributedDataParallel) and not last_micro_batch:
        return module.no_sync()
    if is_sharded(module):
        module.set_requires_gradient_sync(last_micro_batch)
    return contextlib.nullcontext()


def full(value: Tensor) -> Tensor:
    """A plain tensor: a DTensor (a sharded parameter, or a norm over shards) gathered."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def clip_grads_(params, max_norm: float, total: Tensor) -> None:
    """Scale the gradients by min(1, max_norm / (total + 1e-6)), as clip_grads_with_norm_
    does; sharded gradients are scaled shard by shard (the total is the global norm)."""
    params = [p for p in params if p.grad is not None]
    if params and isinstance(params[0].grad, DTensor):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad.to_local() for p in params], coef)
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The full model weights: model.state_dict(), or under FSDP a collective after which
    rank 0 holds the gathered weights on the CPU (the other ranks an empty dict)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_states(model: nn.Module, optimizers: list) -> list[dict]:
    """Each optimiser's state_dict() in the one-process format (states keyed by the
    parameter's index); under FSDP gathered by a collective, and only rank 0's is filled."""
    if not is_sharded(model):
        return [opt.state_dict() for opt in optimizers]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = []
    for opt in optimizers:
        by_name = get_optimizer_state_dict(model, opt, options=options)
        index = {name: i for i, name in enumerate(_names(model, opt))}
        out.append({"state": {index[n]: v for n, v in by_name.get("state", {}).items()},
                    "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                     for g in by_name.get("param_groups", [])]})
    return out


def load_optimizer_states(model: nn.Module, optimizers: list, states: list[dict]) -> None:
    """Load one-process optimiser state dicts (every rank reads the full ones)."""
    if not is_sharded(model):
        for opt, state in zip(optimizers, states):
            opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    for opt, state in zip(optimizers, states):
        names = _names(model, opt)
        by_name = {"state": {names[i]: v for i, v in state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def _names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimiser's index order (the order of its param groups)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in opt.param_groups for p in group["params"]]


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's flag on every rank (itself in a one-process run)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(value, 0)
    return bool(value.item())


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


__all__ = ["Process", "is_main_process", "start", "wrap", "shard", "is_sharded", "sync_context", "full", "clip_grads_",
           "full_state", "full_optimizer_states", "load_optimizer_states", "broadcast_flag", "all_reduce", "barrier",
           "stop"]
