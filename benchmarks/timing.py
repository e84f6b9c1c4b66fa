"""Side-by-side timing: alternate the contenders round by round so that a noisy,
shared machine slows them alike, and compare medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def alternate(contenders: dict[str, Callable[[], object]], rounds: int = 15, warmup: int = 3,
              inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, measured in alternating rounds."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        order = list(contenders.items())
        if r % 2:
            order.reverse()  # neither contender always runs first
        for name, fn in order:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}
