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

The rules themselves (`step_verdict`) and the spike detector live in
stabilitylab.analysis.events, so that offline analysis of any run finds exactly the
steps the trainer flags; this module adds what training needs: the action, and a
state that checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stabilitylab.analysis.events import SpikeDetector, step_verdict
from stabilitylab.config import DivergenceConfig
from stabilitylab.records import DIVERGENCE, SPIKE


@dataclass
class Verdict:
    """What one step's check found: events to log as (kind, detail), and the reason to
    stop, if the run ends here."""

    events: list[tuple[str, str]] = field(default_factory=list)
    stop: str | None = None


class DivergenceMonitor:
    """Applies DivergenceConfig step by step; its state goes into checkpoints."""

    def __init__(self, cfg: DivergenceConfig):
        self.cfg = cfg
        self.spikes = SpikeDetector(cfg.spike_window, cfg.spike_k)
        self.crossed: set[str] = set()  # bounds currently crossed (action "record")
        self.first: tuple[int, str] | None = None  # (step, detail) of the first recorded crossing

    def check(self, step: int, loss: float, grad_norm: float, state_norm: float) -> Verdict:
        verdict = Verdict()
        terminal, crossed = step_verdict(loss, grad_norm, state_norm, self.cfg.max_loss, self.cfg.max_state_norm)
        if terminal:
            verdict.stop = terminal
            verdict.events.append((DIVERGENCE, terminal))
            return verdict
        for name in ("max_state_norm", "max_loss"):
            detail = crossed.get(name)
            if detail is None:
                self.crossed.discard(name)
            elif self.cfg.action == "stop":
                verdict.stop = verdict.stop or detail
                verdict.events.append((DIVERGENCE, detail))
            elif name not in self.crossed:
                self.crossed.add(name)
                self.first = self.first or (step, detail)
                verdict.events.append((DIVERGENCE, detail + " (recorded; training goes on)"))
        spike = self.spikes.update(loss)
        if spike:
            verdict.events.append((SPIKE, spike))
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
