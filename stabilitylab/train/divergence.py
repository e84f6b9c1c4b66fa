"""Divergence is data: the rules that end (or mark) a run, and loss spikes.

Checked every step, after the backward pass and before the optimiser step:

    non-finite loss or gradient norm              terminal, whatever the action
    loss > max_loss                               a bound
    max per-token ‖h_T‖ > max_state_norm          a bound (the one that catches a loop that
                                                  explodes while its loss stays finite)

A crossed bound ends the run (action "stop") or is logged as a `divergence` event the
first time it is crossed, and again after it has recovered (action "record"). A run
that recorded a crossing trains to the end and then ends as `diverged` too, at the
step of its first crossing: the status says what happened, the records show all of it.
A spike, loss > median + k · MAD over the last `window` finite losses, is logged as a
`spike` event and never ends a run (MAD = median |loss − median|).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from stabilitylab.train.config import DivergenceConfig


@dataclass
class Verdict:
    """What one step's check found: events to log as (kind, detail), and the reason to
    stop, if the run ends here."""

    events: list[tuple[str, str]] = field(default_factory=list)
    stop: str | None = None


class SpikeDetector:
    """Rolling median + k·MAD rule over the last `window` finite losses."""

    def __init__(self, window: int, k: float):
        self.k = k
        self.losses: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> str | None:
        """Add a loss; return a description if it is a spike against the window before it."""
        spike = None
        if self.losses.maxlen and len(self.losses) == self.losses.maxlen:
            median = statistics.median(self.losses)
            mad = statistics.median(abs(x - median) for x in self.losses)
            if loss > median + self.k * mad:
                spike = f"loss {loss:.4g} > median {median:.4g} + {self.k:g} × MAD {mad:.3g}"
        if math.isfinite(loss):
            self.losses.append(loss)
        return spike


class DivergenceMonitor:
    """Applies DivergenceConfig step by step; its state goes into checkpoints."""

    def __init__(self, cfg: DivergenceConfig):
        self.cfg = cfg
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_k)
        self.crossed: set[str] = set()  # bounds currently crossed (action "record")
        self.first: tuple[int, str] | None = None  # (step, detail) of the first recorded crossing

    def check(self, step: int, loss: float, grad_norm: float, state_norm: float) -> Verdict:
        verdict = Verdict()
        if not math.isfinite(loss):
            verdict.stop = f"loss is {loss}"
        elif not math.isfinite(grad_norm):
            verdict.stop = f"gradient norm is {grad_norm}"
        if verdict.stop:
            verdict.events.append(("divergence", verdict.stop))
            return verdict
        bounds = {"max_state_norm": (not state_norm <= self.cfg.max_state_norm,
                                     f"‖h_T‖ {state_norm:.4g} > max_state_norm {self.cfg.max_state_norm:g}"),
                  "max_loss": (loss > self.cfg.max_loss, f"loss {loss:.4g} > max_loss {self.cfg.max_loss:g}")}
        for name, (crossed, detail) in bounds.items():
            if not crossed:
                self.crossed.discard(name)
            elif self.cfg.action == "stop":
                verdict.stop = verdict.stop or detail
                verdict.events.append(("divergence", detail))
            elif name not in self.crossed:
                self.crossed.add(name)
                self.first = self.first or (step, detail)
                verdict.events.append(("divergence", detail + " (recorded; training goes on)"))
        spike = self.spikes.update(loss)
        if spike:
            verdict.events.append(("spike", spike))
        return verdict

    def state_dict(self) -> dict:
        return {"losses": list(self.spikes.losses), "crossed": sorted(self.crossed),
                "first": list(self.first) if self.first else None}

    def load_state_dict(self, state: dict) -> None:
        self.spikes.losses.clear()
        self.spikes.losses.extend(state["losses"])
        self.crossed = set(state["crossed"])
        self.first = tuple(state["first"]) if state["first"] else None


__all__ = ["Verdict", "SpikeDetector", "DivergenceMonitor"]
