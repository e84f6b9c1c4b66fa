"""Side-by-side timing: alternate the contenders round by round so that a noisy,
shared machine slows them alike, and compare medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def alternate(contenders: dict[str, Callable[[], object]], rounds: int = 15, warmup: int = 3,
              inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each contender, measured in alternating rounds."""
    times = alternate_clocks(contenders, {"wall": time.perf_counter}, rounds, warmup, inner)
    return {name: by_clock["wall"] for name, by_clock in times.items()}


def alternate_clocks(contenders: dict[str, Callable[[], object]], clocks: dict[str, Callable[[], float]],
                     rounds: int = 15, warmup: int = 3, inner: int = 1) -> dict[str, dict[str, float]]:
    """Median seconds per call of each contender on each clock (e.g. wall and CPU time),
    measured in alternating rounds of `inner` calls each."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples = {name: {clock: [] for clock in clocks} for name in contenders}
    for r in range(rounds):
        order = list(contenders.items())
        if r % 2:
            order.reverse()  # neither contender always runs first
        for name, fn in order:
            start = {clock: read() for clock, read in clocks.items()}
            for _ in range(inner):
                fn()
            for clock, read in clocks.items():
                samples[name][clock].append((read() - start[clock]) / inner)
    return {name: {clock: statistics.median(s) for clock, s in by_clock.items()} for name, by_clock in samples.items()}
