"""Probe overhead: training throughput with the default probe cadences (loop trace and
injection spectrum every 10 steps; the per-step scalars are always on) against probes
off, on the quick experiment's model (width 128, 1/2/1 blocks, μ_rec 8, batch 8 × 64).

Side by side: whole 31-step runs alternate (probes on, probes off, ...) so the noise of
this shared machine hits both alike. Each run's steady per-step time is read from its
own `wall_time` scalar, (wall_time[S] − wall_time[1]) / (S − 1): probes included; setup,
final evaluation and checkpoint excluded. The ratio is the median of the rounds' ratios.
On this machine it swings by several percent between suite runs (other jobs' load), so
the test asserts on an accounting that noise cannot move: the share of the same
interval spent inside Probes.run (throughput ratio ≈ 1 − share). The run store's share
is the time spent inside RunWriter's per-step methods over the training time.

    STABILITYLAB_BENCH_THREADS=1 .venv/bin/python -m pytest benchmarks/test_bench_probes.py --benchmark-only -s

The analysis probe (test_analysis_probe_in_training_steps) is timed apart: in
training steps' worth, side by side with a step and with its former method.
"""

import itertools
import os
import statistics
import time
from pathlib import Path

from conftest import THREADS
from timing import alternate

from stabilitylab.experiment import load_experiment
from stabilitylab.store import RunWriter, open_run
from stabilitylab.train.probes import Probes, analysis_probe
from stabilitylab.train.trainer import train

QUICK = Path(__file__).resolve().parents[1] / "experiments" / "quick.toml"
STEPS = 31  # the probes of steps 10, 20 and 30 all fall between the first and last logged wall_time
PER_STEP = ("log", "log_trace", "log_spectrum", "log_eval", "log_event")  # what training steps write
WRITER_METHODS = (*PER_STEP, "create", "resume", "add_checkpoint", "remove_checkpoint", "set_status", "close")


def clock(monkeypatch, cls, names):
    """Seconds spent inside the methods `names` of `cls`, by method (nested calls counted once)."""
    spent, depth = dict.fromkeys(names, 0.0), [0]

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[name] += time.perf_counter() - start
        return wrapper

    for name in names:
        attr = cls.__dict__[name]
        wrapped = classmethod(timed(name, attr.__func__)) if isinstance(attr, classmethod) else timed(name, attr)
        monkeypatch.setattr(cls, name, wrapped)
    return spent


def test_default_probes_keep_throughput_within_5_percent(benchmark, tmp_path, monkeypatch):
    store_clock = clock(monkeypatch, RunWriter, WRITER_METHODS)
    probe_clock = clock(monkeypatch, Probes, ["run"])
    sets = [f"data.cache_dir={tmp_path / 'cache'}", f"train.steps={STEPS}", "train.eval_every=0",
            "train.eval_batches=1", "train.eval_depths=['mu']", "train.checkpoint_every=0",
            "model.injection='parcae'", "divergence.action='record'"]
    configs = {"probes on": load_experiment(QUICK, [*sets, "probes.trace_every=10", "probes.spectrum_every=10"]),
               "probes off": load_experiment(QUICK, [*sets, "probes.trace_every=0", "probes.spectrum_every=0"])}
    ids = itertools.count()
    per_step = {name: [] for name in configs}
    step_share, run_share, probe_share = [], [], []

    def contender(name):
        def run():
            run_id = f"{name.replace(' ', '-')}-{next(ids)}"
            before, probes_before, start = dict(store_clock), probe_clock["run"], time.perf_counter()
            train(configs[name], tmp_path / "lab", run_id, progress=False)
            total = time.perf_counter() - start
            wall = open_run(run_id, tmp_path / "lab").scalars(["wall_time"])["value"].to_numpy()
            per_step[name].append((wall[-1] - wall[0]) / (len(wall) - 1))
            if name == "probes on" and len(per_step[name]) > 1:  # the first call is the warmup
                spent = {k: store_clock[k] - before[k] for k in WRITER_METHODS}
                step_share.append(sum(spent[k] for k in PER_STEP) / wall[-1])
                run_share.append(sum(spent.values()) / total)
                probe_share.append((probe_clock["run"] - probes_before) / (wall[-1] - wall[0]))
        return run

    alternate({name: contender(name) for name in configs}, rounds=7, warmup=1)
    on, off = (statistics.median(per_step[n][1:]) for n in ("probes on", "probes off"))
    ratio = statistics.median(b / a for a, b in zip(per_step["probes on"][1:], per_step["probes off"][1:]))
    step_share, run_share = statistics.median(step_share), statistics.median(run_share)
    probe_share = statistics.median(probe_share)
    benchmark.extra_info.update(threads=THREADS, step_ms_probes_on=on * 1e3, step_ms_probes_off=off * 1e3,
                                throughput_ratio=ratio, probe_share_of_training=probe_share,
                                store_share_of_training=step_share, store_share_of_run=run_share)
    print(f"\nprobes, {THREADS} threads: step {on * 1e3:.1f} ms with default probes, {off * 1e3:.1f} ms without; "
          f"side-by-side throughput ratio {ratio:.3f}; probes {probe_share:.2%} of training time "
          f"(ratio ≈ {1 - probe_share:.3f}); run-store writes {step_share:.2%} of training time "
          f"({run_share:.2%} of a {STEPS}-step run with creating, checkpoint indexing and closing)")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert probe_share <= 0.05, f"default probes take {probe_share:.1%} of training time"
    assert step_share < 0.01, f"the run store's writes take {step_share:.2%} of training time"


def test_analysis_probe_in_training_steps(benchmark, tmp_path):
    """The analysis probe at the quick setting (probe batch 2 × 64, depth 2·μ_rec = 16, k = 8,
    d_state 128) in training steps' worth (a quick training step: batch 8 × 64, sampled
    depths, AdamW), alternated in one run with the step and with the probe's former method
    (the whole B·d Jacobian formed densely from 256 JVPs in one vmapped call, then the same
    Lyapunov exponents). The model is moved off its init so that the loop is not linear."""
    import torch

    import stabilitylab as sl
    from stabilitylab.analysis import loop_jacobian, loop_lyapunov

    exp = load_experiment(QUICK, ["model.injection=parcae"])
    cfg = exp.model
    torch.manual_seed(0)
    model = sl.LoopedLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = (torch.randint(0, cfg.vocab_size, (8, 64), generator=g) for _ in range(2))
    h0_step = model.draw_state((8, 64), "cpu", torch.float32, g)
    tokens, h0 = x[:2], model.draw_state((2, 64), "cpu", torch.float32, g)
    depth, k = 2 * cfg.mean_recurrence, 8

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        model(x, y, depth=sl.sample_depth(cfg, 3, 0, 8, 64), h0=h0_step).loss.backward()
        opt.step()

    writer = RunWriter.create(tmp_path, "probe", {}, experiment="bench")

    def probe():
        with torch.no_grad():
            analysis_probe(model, tokens, h0, depth, 1, writer)

    def former():
        loop_jacobian(model, tokens, depth, position=-1, h0=h0, k=k, method="dense")
        loop_lyapunov(model, tokens, depth, k=k, position=-1, h0=h0)

    times = alternate({"step": step, "probe": probe, "former": former}, rounds=5, warmup=1)
    steps, former_steps = times["probe"] / times["step"], times["former"] / times["step"]
    benchmark.extra_info.update(threads=THREADS, load=os.getloadavg()[0], step_ms=times["step"] * 1e3,
                                probe_ms=times["probe"] * 1e3, former_ms=times["former"] * 1e3,
                                probe_steps=steps, former_steps=former_steps)
    print(f"\nanalysis probe, {THREADS} threads, load {os.getloadavg()[0]:.1f}: step {times['step'] * 1e3:.0f} ms, "
          f"probe {times['probe'] * 1e3:.0f} ms = {steps:.1f} steps (former method {times['former'] * 1e3:.0f} ms "
          f"= {former_steps:.1f} steps, {times['former'] / times['probe']:.1f}x)")
    benchmark.pedantic(probe, rounds=1, iterations=1)
    writer.close()
