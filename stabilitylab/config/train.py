"""What a training run does: optimisation, probes and divergence rules, as dataclasses.

Each is one TOML table of an experiment ([train], [probes], [divergence]); defaults are
the lab's small CPU setting. docs/training.md lists every field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stabilitylab.config.base import FLOAT32_MAX, ConfigError, check_choice, check_numbers, number

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("trapezoid", "cosine")
DEVICES = ("auto", "cpu", "cuda")
DIVERGENCE_ACTIONS = ("stop", "record")
PARALLEL = ("ddp", "fsdp")
PARAM_DTYPES = ("auto", "bfloat16", "float32")
_MU_DEPTH = re.compile(r"(\d*)mu")  # "mu", "2mu": multiples of the model's mean_recurrence


@dataclass
class TrainConfig:
    """Optimiser, schedule, evaluation and checkpoint cadence of one run."""

    steps: int = number(200, "(0, inf)")  # optimiser steps
    flop_budget: float = number(0.0, "[0, inf)")  # > 0: steps = budget / training FLOPs of a step (isoFLOP)
    batch_size: int = number(16, "(0, inf)")  # global batch (sequences per step, over all processes and micro-batches)
    grad_accum: int = number(1, "(0, inf)")  # micro-batches per step; a process runs B / (world · grad_accum) rows
    lr: float = number(3e-3, "(0, inf)")  # peak learning rate of AdamW
    weight_decay: float = number(0.1, "[0, inf)")  # decoupled; only on 2-D block weights and embeddings
    betas: tuple[float, float] = number((0.8, 0.95), "[0, 1)")  # AdamW (reference)
    eps: float = number(1e-10, "(0, inf)")  # AdamW (reference)
    optimizer: str = "adamw"  # adamw, or muon (Muon for 2-D block weights, AdamW for the rest)
    muon_lr: float = number(0.02, "[0, inf)")  # peak learning rate of Muon (optimizer = "muon")
    muon_momentum: float = number(0.95, "[0, 1)")
    schedule: str = "trapezoid"  # trapezoid (warmup, constant, linear cooldown) or cosine
    warmup_steps: int = number(0, "[0, inf)")  # linear warmup from lr / warmup_steps to lr
    cooldown_fraction: float = number(0.5, "[0, 1]")  # trapezoid: the last fraction of steps decays linearly
    min_lr_ratio: float = number(0.0, "[0, 1]")  # the final learning rate, as a fraction of the peak
    grad_clip: float = number(1.0, "[0, inf)")  # clip the global gradient norm to this (0 = off)
    eval_every: int = number(100, "[0, inf)")  # validation loss at eval_depths every this many steps (0 = at the end)
    eval_depths: tuple[int | str, ...] = (1, 2, 4, "mu", "2mu")  # ints, or "mu" / "<k>mu" = k·μ_rec
    eval_batches: int = number(4, "(0, inf)")  # fixed validation batches of batch_size sequences
    checkpoint_every: int = number(100, "[0, inf)")  # checkpoint cadence in steps (the last step is always saved)
    keep_checkpoints: int = number(2, "[0, inf)")  # newest checkpoints kept on disk (0 = all)
    seed: int = number(0, "[0, inf)")  # model init, batches, depths and initial states all follow from it
    device: str = "auto"  # auto = cuda if available, else cpu; bf16 autocast on cuda
    compile: bool | str = "auto"  # torch.compile the blocks: true, false, or "auto" (when the run is long enough)
    parallel: str = "ddp"  # several processes (torchrun): ddp (replicas) or fsdp (FSDP2: sharded weights and optimiser)
    param_dtype: str = "auto"  # fsdp compute dtype (reduce in float32): auto = bfloat16 on cuda, float32 on cpu
    activation_checkpointing: bool = False  # recompute each gradient iteration of the core in backward (less memory)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.eval_depths = tuple(self.eval_depths)
        check_numbers(self)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("device", self.device, DEVICES)
        check_choice("parallel", self.parallel, PARALLEL)
        check_choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        if self.parallel == "fsdp" and self.optimizer == "muon":
            raise ConfigError("optimizer", "muon needs whole matrices, and fsdp shards them",
                              'Use optimizer = "adamw" with parallel = "fsdp", or parallel = "ddp" with muon')
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ConfigError("compile", f"{self.compile!r} is not allowed", 'Allowed: true, false, "auto"')
        if len(self.betas) != 2:
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {list(self.betas)}",
                              "The reference uses [0.8, 0.95]")
        for what, value in (("lr / (1 − betas[0])", self.lr / (1 - self.betas[0])),
                            ("lr · weight_decay", self.lr * self.weight_decay),
                            ("muon_lr · weight_decay", self.muon_lr * self.weight_decay)):
            if value > FLOAT32_MAX:  # AdamW's first step size and the decay factors are float32 scalars
                raise ConfigError("lr" if what.startswith("lr") else "muon_lr",
                                  f"the optimiser's {what} = {value:.3g} overflows float32",
                                  "Lower the learning rate (or weight_decay, betas[0])")
        if self.warmup_steps >= self.steps:
            raise ConfigError("warmup_steps", f"{self.warmup_steps} is not below steps = {self.steps}",
                              "Warm up over fewer steps than the run has")
        if self.batch_size % self.grad_accum:
            raise ConfigError("grad_accum", f"batch_size {self.batch_size} does not split into {self.grad_accum} "
                              "micro-batches", "Choose grad_accum among the divisors of batch_size")
        for depth in self.eval_depths:
            resolve_depth(depth, 1)  # raises on a malformed entry

    def depths(self, mean_recurrence: int) -> list[int]:
        """eval_depths resolved against μ_rec: sorted, without repeats."""
        return sorted({resolve_depth(d, mean_recurrence) for d in self.eval_depths})


def resolve_depth(depth: int | str, mean_recurrence: int) -> int:
    """An int ≥ 1, or "mu" / "<k>mu" (k · mean_recurrence)."""
    if isinstance(depth, str):
        match = _MU_DEPTH.fullmatch(depth)
        if match is None:
            raise ConfigError("eval_depths", f"{depth!r} is not a depth",
                              'Use integers ≥ 1, "mu" (μ_rec) or "<k>mu" such as "2mu"')
        depth = int(match.group(1) or 1) * mean_recurrence
    if depth < 1:
        raise ConfigError("eval_depths", f"{depth} is not a depth", "Every depth is ≥ 1 loop iteration")
    return depth


@dataclass
class ProbeConfig:
    """What is measured besides the per-step scalars, and how often (0 = never)."""

    trace_every: int = number(10, "[0, inf)")  # loop trace over iterations t = 1..T on the probe batch
    spectrum_every: int = number(10, "[0, inf)")  # eigenvalues of Ā, ρ(Ā), ‖Ā‖₂, ‖B̄‖₂, ‖C‖₂, ‖e‖
    analysis_every: int = number(0, "[0, inf)")  # Jacobian spectrum and Lyapunov exponents (stabilitylab.analysis)
    radius_every: int = number(0, "[0, inf)")  # ρ(∂F/∂h) estimate at the training batch's h_T (LoopMonitor)
    rate_every: int = number(0, "[0, inf)")  # contraction rate of the training forward's own loop trace
    trace_depth: int | str = "2mu"  # loop iterations of the trace: an int or "<k>mu"
    batch_size: int = number(2, "(0, inf)")  # sequences of the fixed probe batch (the first validation windows)

    def __post_init__(self) -> None:
        check_numbers(self)
        try:
            resolve_depth(self.trace_depth, 1)
        except ConfigError as err:
            raise ConfigError("trace_depth", err.problem, err.fix) from None


@dataclass
class DivergenceConfig:
    """When a run counts as diverged, and what happens then.

    Always terminal: a non-finite loss or gradient. Bounds: loss > max_loss, or
    max per-token ‖h_T‖ > max_state_norm. action "stop" ends the run as diverged at
    the first bound crossed; "record" logs a `divergence` event each time a bound is
    first crossed and keeps training, so the explosion itself can be studied.
    Spikes (never terminal): loss > median + spike_k · MAD over the last spike_window
    losses is logged as a `spike` event.
    """

    max_loss: float = number(20.0, "(0, inf]")  # nats per token; ln(vocab) is chance level
    max_state_norm: float = number(1e4, "(0, inf]")  # per-token ‖h_T‖; a healthy small model stays below ~100
    action: str = "stop"  # stop | record
    spike_window: int = number(50, "[0, inf)")  # losses in the rolling window (0 = no spike detection)
    spike_k: float = number(6.0, "(0, inf)")  # how many MADs above the rolling median is a spike

    def __post_init__(self) -> None:
        check_numbers(self)
        check_choice("action", self.action, DIVERGENCE_ACTIONS)


__all__ = ["TrainConfig", "ProbeConfig", "DivergenceConfig", "resolve_depth", "OPTIMIZERS", "SCHEDULES",
           "DEVICES", "DIVERGENCE_ACTIONS", "PARALLEL", "PARAM_DTYPES"]
