"""Shared test settings: deterministic torch, no hypothesis deadlines (the machine is noisy)."""

import contextlib
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("lab", deadline=None, max_examples=50, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lab"))
torch.set_num_threads(int(os.environ.get("STABILITYLAB_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A token cache shared by the training tests (Shakespeare, bytes: built once, ~1 s)."""
    from stabilitylab.data import DataConfig, prepare

    cache = tmp_path_factory.mktemp("corpus-cache")
    prepare(DataConfig(tokenizer="bytes", seq_len=32, cache_dir=str(cache)))
    return cache


# Tiny runs trained at learning rates far above the default 3e-3 (6 steps; checkpoints at 3 and 6):
# the injections that promise ρ(Ā) < 1 keep it, the unconstrained ones do not (tests/test_check_cli.py).
PUSHED_RUNS = {
    "parcae": ["model.injection=parcae", "train.lr=0.1", "probes.analysis_every=3"],
    "parcae-zoh": ["model.injection=parcae-zoh", "train.lr=0.1"],
    "stable-dense": ["model.injection=stable-dense", "train.lr=0.1"],
    "concat": ["model.injection=concat", "train.lr=0.1"],
    "free-diagonal": ["model.injection=free-diagonal", "train.lr=0.3", "divergence.action=record"],
}


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models: they gain nothing from a second one, and
    on a loaded 2-core machine two OpenMP threads wait on each other (a tiny `check` measured
    9 s with two threads at load average 7, 0.2 s with one)."""
    with threads(1):
        yield


@pytest.fixture(scope="session")
def pushed_lab(tmp_path_factory, corpus_cache):
    """A lab of PUSHED_RUNS trained through the trainer (4 s on one thread)."""
    from pathlib import Path

    from stabilitylab.experiment import load_experiment
    from stabilitylab.train.trainer import train

    lab = tmp_path_factory.mktemp("pushed-lab")
    tiny = Path(__file__).resolve().parents[1] / "experiments" / "tiny.toml"
    with threads(1):
        for run_id, sets in PUSHED_RUNS.items():
            train(load_experiment(tiny, [f"data.cache_dir={corpus_cache}", *sets]), lab, run_id, progress=False)
    return lab
