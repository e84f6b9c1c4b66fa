"""Compiled against eager training steps, and what compilation costs: the numbers behind
train.compile = "auto" (stabilitylab/train/compiling.py).

The benchmark setting of test_bench_train_step.py (width 128, 1/1/1 blocks, sequence 128,
batch 8, depth 2 no-grad + 2 grad, AdamW), once with the blocks compiled by inductor
(compile_blocks, as the trainer does) and once eager, alternated round by round. The
compilation is timed twice: cold (an empty inductor cache) and warm (torch.compiler.reset()
and compiling again with the cache the first one filled: the second cell of a sweep).
Break-even: compile seconds / seconds saved per step, in steps and in training FLOPs.

    STABILITYLAB_BENCH_THREADS=2 .venv/bin/python -m pytest benchmarks/test_bench_compile.py --benchmark-only -s
"""

from __future__ import annotations

import os
import time

import torch
from conftest import THREADS
from test_bench_train_step import BATCH, OURS, SEQ, step_fn
from timing import alternate

import stabilitylab as sl
from stabilitylab.model import training_flops_per_token
from stabilitylab.train.compiling import compile_blocks

H0 = torch.Generator().manual_seed(0)


def forward_with_h0(model, x, y, h0=[]):
    """The trainer's call: a given h_0 (drawn once here), a Depth(2, 2)."""
    if not h0:
        h0.append(model.draw_state((BATCH, SEQ), "cpu", torch.float32, H0))
    return model(x, targets=y, depth=sl.Depth(2, 2), h0=h0[0]).loss


def first_steps(step) -> float:
    """Seconds of the first two steps: where compilation happens (forward, then backward)."""
    start = time.perf_counter()
    step()
    step()
    return time.perf_counter() - start


def test_compiled_step_against_eager(benchmark, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold cache
    torch.compiler.reset()
    torch.manual_seed(0)
    eager = step_fn(sl.LoopedLM(OURS), forward_with_h0)
    torch.manual_seed(0)
    model = sl.LoopedLM(OURS)
    compile_blocks(model)
    compiled = step_fn(model, forward_with_h0)
    eager_first = first_steps(eager)
    cold = first_steps(compiled) - eager_first
    torch.compiler.reset()  # drop the compiled code; the on-disk cache stays
    warm = first_steps(compiled) - eager_first
    times = alternate({"eager": eager, "compiled": compiled}, rounds=15, warmup=2)
    saved = times["eager"] - times["compiled"]
    flops = training_flops_per_token(OURS, SEQ, 2, 2).total * BATCH * SEQ
    even_cold, even_warm = (c / saved if saved > 0 else float("inf") for c in (cold, warm))
    benchmark.extra_info.update(threads=THREADS, load=os.getloadavg()[0], eager_ms=times["eager"] * 1e3,
                                compiled_ms=times["compiled"] * 1e3, speedup=times["eager"] / times["compiled"],
                                compile_cold_s=cold, compile_warm_s=warm, break_even_steps_cold=even_cold,
                                break_even_flops_cold=even_cold * flops, break_even_steps_warm=even_warm)
    print(f"\ncompiled vs eager step, {THREADS} threads, load {os.getloadavg()[0]:.1f}: eager "
          f"{times['eager'] * 1e3:.0f} ms, compiled {times['compiled'] * 1e3:.0f} ms, speedup "
          f"{times['eager'] / times['compiled']:.2f}x; compilation {cold:.0f} s cold, {warm:.0f} s warm; "
          f"break-even {even_cold:.0f} steps cold = {even_cold * flops:.2e} FLOPs ({flops:.2e} per step), "
          f"{even_warm:.0f} steps warm")
    benchmark.pedantic(compiled, rounds=3, iterations=1)
