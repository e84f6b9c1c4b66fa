"""Benchmarks share one thread setting, stated in every report."""

import os
import sys
from pathlib import Path

import torch

THREADS = int(os.environ.get("STABILITYLAB_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)
sys.path.insert(0, str(Path(__file__).parent))  # so benchmarks can `import timing`
