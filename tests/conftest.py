"""Shared test settings: deterministic torch, no hypothesis deadlines (the machine is noisy)."""

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
