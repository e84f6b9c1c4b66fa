"""LoopMonitor's cost beside one training step at the small reference setting (the model of
test_bench_train_step.py: width 128, 4 heads, 1/1/1 layers, vocab 256, sequence 128,
batch 8, depth 2 no-grad + 2 grad iterations, parcae), measured side by side in one run:

    off     forward + backward + AdamW step
    trace   the same forward with trace=True (what the contraction rate reads)
    on      trace, then monitor.step with every default instrument (‖∇‖, ‖h_T‖, the
            contraction rate, the radius estimate every RADIUS_EVERY steps, spectrum every 10)
    every   the same with the radius estimate every step (radius_every = 1)

Each sample is RADIUS_EVERY consecutive steps (so `on` holds one radius update), timed on
two clocks at once: wall time (throughput) and this thread's CPU time (what the process
itself spent: far less disturbed by other processes on a shared machine). Contenders
alternate round by round; the report gives medians and the throughput ratios off / on.

    STABILITYLAB_BENCH_THREADS=1 python -m pytest benchmarks/test_bench_monitor.py --benchmark-only -s
"""

from __future__ import annotations

import itertools
import time

import torch
from conftest import THREADS
from timing import alternate_clocks

import stabilitylab as sl
from stabilitylab.monitor import RADIUS_EVERY, LoopMonitor, MonitorConfig

BATCH, SEQ, VOCAB = 8, 128, 256
SMALL = sl.ModelConfig(vocab_size=VOCAB, block_size=SEQ, d_model=128, n_heads=4, n_prelude=1, n_core=1,
                       n_coda=1, mean_recurrence=4, backprop_depth=2, value_embed_layers=(2,))
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def loop(trace: bool, lab=None, config: MonitorConfig = MonitorConfig()):
    """One training step (a function), and its monitor (when `lab` is given) or None."""
    torch.manual_seed(0)
    model = sl.LoopedLM(SMALL)
    monitor = LoopMonitor(model, lab, f"bench-{config.radius_every}", config=config) if lab is not None else None
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
    every, every_monitor = loop(trace=True, lab=tmp_path, config=MonitorConfig(radius_every=1))
    times = alternate_clocks({"off": off, "trace": traced, "on": on, "every": every}, CLOCKS, rounds=21,
                             warmup=2 * RADIUS_EVERY, inner=RADIUS_EVERY)  # a round: one radius update
    monitor.close()
    every_monitor.close()
    ratio = {clock: times["off"][clock] / times["on"][clock] for clock in CLOCKS}
    ratio_every = {clock: times["off"][clock] / times["every"][clock] for clock in CLOCKS}
    benchmark.extra_info.update(threads=THREADS, radius_every=RADIUS_EVERY, throughput_ratio=ratio["wall"],
                                cpu_ratio=ratio["cpu"], every_step_ratio=ratio_every["wall"],
                                **{f"{k}_{c}_ms": v[c] * 1e3 for k, v in times.items() for c in CLOCKS})
    print(f"\nmonitor, {THREADS} threads, per step (wall | cpu ms): "
          + ", ".join(f"{k} {v['wall'] * 1e3:.1f} | {v['cpu'] * 1e3:.1f}"
                      for k, v in times.items())
          + f"\nthroughput off/on (radius every {RADIUS_EVERY}): wall ×{ratio['wall']:.3f}, cpu ×{ratio['cpu']:.3f}; "
          f"radius every step: wall ×{ratio_every['wall']:.3f}, cpu ×{ratio_every['cpu']:.3f}")
    benchmark.pedantic(on, rounds=1, iterations=1)
