"""LoopMonitor's cost beside one training step at the small reference setting (the model of
test_bench_train_step.py: width 128, 4 heads, 1/1/1 layers, vocab 256, sequence 128,
batch 8, depth 2 no-grad + 2 grad iterations, parcae), measured side by side in one run:

    off     forward + backward + AdamW step
    trace   the same forward with trace=True (what the contraction rate reads)
    on      trace, then monitor.step with every default instrument (‖∇‖, ‖h_T‖, the
            contraction rate, the radius estimate: 2 JVPs on 1 sequence, spectrum every 10)

    STABILITYLAB_BENCH_THREADS=1 python -m pytest benchmarks/test_bench_monitor.py --benchmark-only -s
"""

from __future__ import annotations

import itertools

import torch
from conftest import THREADS
from timing import alternate

import stabilitylab as sl
from stabilitylab.monitor import LoopMonitor

BATCH, SEQ, VOCAB = 8, 128, 256
SMALL = sl.ModelConfig(vocab_size=VOCAB, block_size=SEQ, d_model=128, n_heads=4, n_prelude=1, n_core=1,
                       n_coda=1, mean_recurrence=4, backprop_depth=2, value_embed_layers=(2,))


def loop(trace: bool, lab=None):
    """A training step function, and its monitor (when `lab` is given) or None."""
    torch.manual_seed(0)
    model = sl.LoopedLM(SMALL)
    monitor = LoopMonitor(model, lab, "bench") if lab is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    steps = itertools.count(1)

    def step():
        out = model(x, targets=y, depth=sl.Depth(2, 2), trace=trace)
        out.loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(next(steps), loss=out.loss, model=model, tokens=x, state=out.state, trace=out.trace)
        opt.zero_grad(set_to_none=True)

    return step, monitor


def test_monitor_overhead_beside_a_training_step(benchmark, tmp_path):
    off, _ = loop(trace=False)
    traced, _ = loop(trace=True)
    on, monitor = loop(trace=True, lab=tmp_path)
    times = alternate({"off": off, "trace": traced, "on": on}, rounds=21, warmup=3, inner=2)
    monitor.close()
    throughput = times["off"] / times["on"]
    benchmark.extra_info.update(threads=THREADS, **{f"{k}_ms": v * 1e3 for k, v in times.items()},
                                throughput_ratio=throughput)
    print(f"\nmonitor, {THREADS} threads: step {times['off'] * 1e3:.1f} ms, with trace {times['trace'] * 1e3:.1f} ms, "
          f"with the monitor {times['on'] * 1e3:.1f} ms: throughput ×{throughput:.3f}")
    benchmark.pedantic(on, rounds=3, iterations=1)
