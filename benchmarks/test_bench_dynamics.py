"""Benchmarks of the loop as a dynamical system, as ratios within one run.

    make bench       (or: .venv/bin/python -m pytest benchmarks/test_bench_dynamics.py --benchmark-only)

The loop: LoopedLM "small" preset (d = 128) with random out-projections (so the core
block is not the identity), float32, one sequence of T = 32 tokens: a state of
T·d = 4096 entries, analysed at h_4. pytest-benchmark prints each group's rows with
their ratio to the fastest in parentheses:

    jacobian-radius-4096   the radius (k = 1): dense (n JVPs + LAPACK eig) vs the matrix-free
                           krylov (block Arnoldi, batched JVPs) and arnoldi (ARPACK); the
                           answers must agree to 1e-4 relative
    lyapunov-step-4096-k*  20 QR (Benettin) orbit steps with k tangents ("qr") vs their
                           floor, 20 calls of k batched JVPs alone ("floor")
"""

import pytest
import torch

import stabilitylab as sl
from stabilitylab.analysis import jacobian_spectral_radius, lyapunov_spectrum
from stabilitylab.analysis.maps import batched_jvp, loop_state

THREADS = 1  # the ratios compare algorithms, not thread scaling; a busy shared box stalls OpenMP teams
STEPS = 20  # orbit steps per Lyapunov round


@pytest.fixture(scope="module")
def loop():
    """(F, h_4) of the small preset at T = 32, with the thread count fixed for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = sl.LoopedLM(sl.ModelConfig(init_state="seeded", zero_init_out=False))
    tokens = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    F, h = loop_state(model, tokens, depth=4)
    assert h.numel() == 4096
    yield F, h
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def radii():
    """The radius each method found, so that the matrix-free one is checked against dense."""
    return {}


def _record(benchmark, **info):
    benchmark.extra_info.update(threads=torch.get_num_threads(), **info)


@pytest.mark.benchmark(group="jacobian-radius-4096")
def test_dense_jacobian_radius(benchmark, loop, radii):
    F, h = loop
    result = benchmark.pedantic(jacobian_spectral_radius, args=(F, h), rounds=1, iterations=1,
                                kwargs=dict(k=1, method="dense", chunk_size=512))
    radii["dense"] = result.radius
    _record(benchmark, radius=result.radius, jvps=result.jvps)


@pytest.mark.parametrize("method", ["krylov", "arnoldi"])
@pytest.mark.benchmark(group="jacobian-radius-4096")
def test_matrix_free_jacobian_radius(benchmark, loop, radii, method):
    F, h = loop
    result = benchmark.pedantic(jacobian_spectral_radius, args=(F, h), rounds=3, iterations=1,
                                kwargs=dict(k=1, method=method))
    dense = radii.get("dense") or jacobian_spectral_radius(F, h, k=1, method="dense", chunk_size=512).radius
    assert result.radius == pytest.approx(dense, rel=1e-4)
    _record(benchmark, radius=result.radius, dense_radius=dense, jvps=result.jvps)


def _jvp_floor(F, h, V):
    for _ in range(STEPS):
        h, _ = batched_jvp(F, h, V)
    return h


@pytest.mark.parametrize("k, path", [(8, "floor"), (8, "qr"), (32, "floor"), (32, "qr")])
def test_lyapunov_step(benchmark, loop, k, path):
    """Each pair runs back to back, so both rows of a group see the same machine."""
    F, h = loop
    benchmark.group = f"lyapunov-step-4096-k{k}"
    if path == "floor":
        V = torch.randn(k, *h.shape, generator=torch.Generator().manual_seed(0))
        benchmark.pedantic(_jvp_floor, args=(F, h, V), rounds=5, iterations=1, warmup_rounds=1)
    else:
        result = benchmark.pedantic(lyapunov_spectrum, args=(F, h, STEPS), kwargs=dict(k=k), rounds=5,
                                    iterations=1, warmup_rounds=1)
        assert result.exponents.shape == (k,)
    _record(benchmark, k=k, steps=STEPS)
