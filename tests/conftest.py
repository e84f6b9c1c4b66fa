"""Shared test settings: deterministic torch, no hypothesis deadlines (the machine is noisy)."""

import os

import torch
from hypothesis import settings

settings.register_profile("lab", deadline=None, max_examples=50, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lab"))
torch.set_num_threads(int(os.environ.get("STABILITYLAB_TEST_THREADS", "2")))
