"""torch.compile where it pays: TrainConfig.compile = true, false or "auto".

What is compiled: every transformer Block, in place (nn.Module.compile, so the state dict
keeps its names and checkpoints do not change). The loop around the blocks stays in
Python: a sampled depth changes only the loop's trip counts and its gating
h ← where(t < nᵢ, F(h), h), never a block's graph, so per-sequence and per-token depths
compile once and never again. A block gets one graph per (grad mode, value embedding or
not) it meets: about four for a 1/1/1 model (the prelude, the core without and with
gradient, the coda). The whole model at a fixed depth also compiles in one graph with no
break (tests/test_compile.py runs torch._dynamo.explain), but there every new trip count
is a new graph, which per-sequence depths hit every few steps.

Evaluation and the probes run eagerly (`eager()`): `stabilitylab eval` reproduces the
trainer's validation numbers bit for bit from a checkpoint, probes never trigger a
compilation, and the analysis probe's torch.func transforms see plain modules.

"auto" compiles when the run is long enough for compilation to amortise:

    compile  ⇔  steps · FLOPs of a step ≥ AUTO_MIN_FLOPS   (on CPU)
                steps ≥ AUTO_MIN_STEPS_CUDA                (on CUDA)

AUTO_MIN_FLOPS is the break-even measured on this 2-core CPU at the benchmark setting
(benchmarks/test_bench_compile.py, 1 torch thread as in a `sweep --jobs 2` cell, load
average 8.5): compiling the blocks took 163 s with an empty inductor cache and made a
step 1.38× faster (580 → 420 ms), so it repays itself after about 1000 steps of 7.0e9
FLOPs, 7e12 FLOPs. Inductor keeps compiled code in its on-disk cache
(TORCHINDUCTOR_CACHE_DIR, shared by every process of the user), so a second run of the
same shapes (the next cell of a sweep) compiled in 1 s there, and repaid it in 5 steps;
the rule counts the cold cost. The CUDA rule is not measured here (no GPU in this lab):
a GPU step is short and compilation costs the same CPU time, so it asks for many steps;
re-measure it with the same benchmark on a GPU.
"""

from __future__ import annotations

import contextlib

import torch

from stabilitylab.config import ModelConfig, TrainConfig
from stabilitylab.model import training_flops_per_token
from stabilitylab.model.blocks import Block

AUTO_MIN_FLOPS = 7e12  # CPU break-even, cold cache: see the module docstring and docs/training.md
AUTO_MIN_STEPS_CUDA = 2000  # not measured in this lab (no GPU); see the module docstring


def compile_pays(tc: TrainConfig, cfg: ModelConfig, seq_len: int, device: torch.device) -> bool:
    """Whether to compile this run: tc.compile if it is a bool, else the "auto" rule above
    (the FLOPs of a step at the nominal depth split n = μ_rec − μ_bwd, k = μ_bwd)."""
    if isinstance(tc.compile, bool):
        return tc.compile
    if device.type == "cuda":
        return tc.steps >= AUTO_MIN_STEPS_CUDA
    return tc.steps * tc.batch_size * seq_len * training_flops_per_token(cfg, seq_len).total >= AUTO_MIN_FLOPS


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> int:
    """torch.compile every Block of `model` in place; returns how many. (backend="eager"
    traces without generating code: how the tests count graphs cheaply.)"""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly inside this context (evaluation, probes)."""
    return torch.compiler.set_stance("force_eager")


__all__ = ["compile_pays", "compile_blocks", "eager", "AUTO_MIN_FLOPS", "AUTO_MIN_STEPS_CUDA"]
