"""Run-store costs: the writer per training step, timed side by side with a tiny training
step (alternating rounds, so the noise of this shared machine hits both alike), and the
dashboard's queries on a lab of 50 runs × 5000 steps.

    make bench        # or: .venv/bin/python -m pytest benchmarks/test_bench_store.py --benchmark-only -s

extra_info of each benchmark carries the derived numbers (µs per step, the ratio, threads).
"""

import itertools

import numpy as np
import pytest
import torch
from conftest import THREADS
from timing import alternate

import stabilitylab as sl
from stabilitylab import store
from stabilitylab.store import RunWriter

SCALARS = ("loss", "lr", "grad_norm", "grad_norm/prelude", "grad_norm/core", "grad_norm/coda",
           "tokens_per_s", "depth_n", "depth_k", "wall_time", "h_T_norm", "flops")  # 12 per step
TRACE_EVERY, SPECTRUM_EVERY, DEPTH, N_EIG = 10, 10, 8, 128
RUNS, STEPS = 50, 5000


def payload(count: int, rng: np.random.Generator) -> tuple[list[dict], dict, np.ndarray]:
    """What a trainer hands the writer: per-step scalar dicts, a LoopTrace dict, eigenvalues."""
    scalars = [dict(zip(SCALARS, row)) for row in rng.random((count, len(SCALARS))).tolist()]
    trace = {name: rng.random(DEPTH).tolist() for name in
             ("state_norm_mean", "state_norm_max", "delta_norm_mean", "rel_residual", "cosine")}
    trace.update(e_norm_mean=1.0, h0_norm_mean=0.5)
    return scalars, trace, rng.random(N_EIG) * np.exp(2j * np.pi * rng.random(N_EIG))


def log_steps(writer: RunWriter, first: int, data: tuple[list[dict], dict, np.ndarray]) -> None:
    """The trainer's default cadence: scalars every step, a loop trace and a spectrum every 10."""
    scalars, trace, eigenvalues = data
    for i, values in enumerate(scalars):
        step = first + i
        writer.log(step, values)
        if step % TRACE_EVERY == 0:
            writer.log_trace(step, trace)
        if step % SPECTRUM_EVERY == 0:
            writer.log_spectrum(step, eigenvalues, norm_a=0.9, norm_b=1.0, norm_c=1.0, norm_e=2.0)


def tiny_train_step():
    """One training step of the `tiny` preset (batch 8 × 32): the cheapest real step here."""
    torch.manual_seed(0)
    cfg = sl.ModelConfig.preset("tiny")
    model = sl.LoopedLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, cfg.vocab_size, (8, 32))

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(tokens, targets=tokens, depth=cfg.mean_recurrence).loss.backward()
        optimizer.step()

    return step


def test_writer_cost_per_logged_step(benchmark, tmp_path):
    """Chunks of 1000 logged steps (about 7 flushes each, at the default flush_rows)."""
    chunk, rng = 1000, np.random.default_rng(0)
    writer = RunWriter.create(tmp_path, "r", {"model": {}}, experiment="bench")
    data, firsts = payload(chunk, rng), itertools.count(1, chunk)

    def write_chunk():
        log_steps(writer, next(firsts), data)

    times = alternate({"train step": tiny_train_step(), "writer": write_chunk}, rounds=15, warmup=2)
    per_step = times["writer"] / chunk
    ratio = per_step / times["train step"]
    benchmark.extra_info.update(threads=THREADS, us_per_step=round(per_step * 1e6, 2),
                                train_step_ms=round(times["train step"] * 1e3, 2), ratio_to_tiny_train_step=ratio)
    print(f"\nwriter, {THREADS} threads: {per_step * 1e6:.1f} µs per logged step; tiny training step "
          f"{times['train step'] * 1e3:.1f} ms; ratio {ratio:.2%}")
    benchmark.pedantic(write_chunk, rounds=5, iterations=1)
    writer.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """50 finished runs × 5000 steps at the default cadence (~1 minute to build)."""
    lab = tmp_path_factory.mktemp("lab")
    rng = np.random.default_rng(0)
    for i in range(RUNS):
        config = {"model": {"injection": ("parcae", "concat")[i % 2], "mean_recurrence": 4},
                  "train": {"lr": 1e-4 * (1 + i % 5)}}
        with RunWriter.create(lab, f"sweep/run{i:02d}", config, experiment="bench", seed=i) as writer:
            log_steps(writer, 1, payload(STEPS, rng))
    return lab


def test_list_runs_of_50_runs_x_5000_steps(benchmark, lab):
    table = benchmark(store.list_runs, lab)
    assert len(table) == RUNS and table["readable"].all() and (table["last_step"] == STEPS).all()
    benchmark.extra_info.update(ms_per_run=round(benchmark.stats.stats.median / RUNS * 1e3, 3))


def test_lab_token_of_50_runs(benchmark, lab):
    benchmark(store.lab_token, lab)


def test_read_loss_of_50_runs_full_resolution(benchmark, lab):
    runs = store.find_runs(lab)
    frame = benchmark(store.read_scalars, runs, ["loss"])
    assert len(frame) == RUNS * STEPS


def test_read_loss_and_lr_of_50_runs_every_10th_step_wide(benchmark, lab):
    runs = store.find_runs(lab)
    frame = benchmark(store.read_scalars, runs, ["loss", "lr"], stride=10, wide=True)
    assert len(frame) == RUNS * STEPS // 10


def test_read_traces_and_spectra_of_one_run(benchmark, lab):
    run = store.find_runs(lab)[0]
    traces, spectra = benchmark(lambda: (run.traces(), run.spectra()))
    assert traces["cosine"].values.shape == (STEPS // TRACE_EVERY, DEPTH) and len(spectra) == STEPS // 10
