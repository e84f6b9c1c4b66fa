"""`stabilitylab analyze`: the loop's Jacobian spectrum and Lyapunov exponents at a target's
checkpoints, printed, and recorded into its run under the names of the trainer's analysis
probe (train/probes.py), so the dashboard's Spectra page shows them.

For one checkpoint, on the target's fixed batch (targets.Target.batch) with its h_0:

    jacobian_radius  ρ(∂F/∂h) at h_D                         analysis.loop_jacobian
    jacobian_moduli  |λ| of the k leading eigenvalues of ∂F/∂h
    lyapunov         the k leading Lyapunov exponents along h_0 → h_D   analysis.loop_lyapunov

in the per-token view at `position` (the block ∂F[p]/∂h[p]; n = B · d_state), with
k = min(ANALYSIS_K, n). Defaults are the run's probe settings (depth = probes.trace_depth,
batch = probes.batch_size, position −1), so analysing a checkpoint reproduces what the
probe logged at that step; other settings overwrite those rows with their own numbers
(the settings of the last analyze are kept as the run's "analyze" result).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stabilitylab import records
from stabilitylab.analysis import JacobianSpectrum, LyapunovSpectrum, loop_jacobian, loop_lyapunov
from stabilitylab.config import ConfigError, ProbeConfig, resolve_depth
from stabilitylab.model.interface import has_loop
from stabilitylab.store import Run, RunWriter
from stabilitylab.targets import Target


@dataclass
class LoopAnalysis:
    """One checkpoint's analysis. step: its training step (None outside a run); batch: (B, T);
    error: why it could not be computed (the state overflowed, a solver did not converge)."""

    target: str
    step: int | None
    depth: int
    position: int
    batch: tuple[int, int]
    jacobian: JacobianSpectrum | None = None
    lyapunov: LyapunovSpectrum | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "step": self.step, "depth": self.depth, "position": self.position,
                "batch": list(self.batch), "error": self.error,
                "jacobian": self.jacobian.to_dict() if self.jacobian else None,
                "lyapunov": self.lyapunov.to_dict() if self.lyapunov else None}

    def text(self) -> str:
        """What `stabilitylab analyze` prints."""
        B, T = self.batch
        lines = [f"{self.target}: depth {self.depth}, batch {B}×{T}, per-token view at position {self.position}"]
        if self.jacobian:
            j = self.jacobian
            moduli = " ".join(f"{m:.4f}" for m in np.abs(j.eigenvalues))
            lines.append(f"  Jacobian   ρ(∂F/∂h) = {j.radius:.6g}   |λ|: {moduli}   "
                         f"({j.method}, {j.jvps} JVPs, n = {j.dim})")
        if self.lyapunov:
            lines.append("  Lyapunov   λ = " + " ".join(f"{x:+.4f}" for x in self.lyapunov.exponents)
                         + f"   (per iteration, over {self.lyapunov.steps} iterations)")
        if self.error:
            lines.append(f"  no analysis: {self.error}")
        return "\n".join(lines)


def analyze(target: Target, jacobian: bool = True, lyapunov: bool = True, depth: int | None = None,
            position: int = -1, batch_size: int | None = None, seq_len: int | None = None,
            seed: int | None = None, tokens: np.ndarray | None = None) -> LoopAnalysis:
    """Analyse the loop of `target` (see the module docstring). depth and batch_size default
    to the run's probe settings (ProbeConfig's defaults outside a run)."""
    model = target.model
    if not has_loop(model):
        raise ConfigError("target", "is a GPT baseline (looped = false): it has no loop to analyse",
                          "analyse a looped model")
    probes = target.experiment.probes if target.experiment is not None else ProbeConfig()
    depth = resolve_depth(probes.trace_depth, model.mu_rec) if depth is None else depth
    if depth < 1:
        raise ConfigError("depth", f"must be ≥ 1, got {depth}", "pass --depth 1 or more")
    batch = target.batch(probes.batch_size if batch_size is None else batch_size, seq_len, seed, tokens)
    B, T = batch.tokens.shape
    if not -T <= position < T:
        raise ConfigError("position", f"{position} is outside a sequence of {T} tokens",
                          f"use a position in {-T}..{T - 1} (−1: the last token)")
    k = min(records.ANALYSIS_K, B * model.state_dim)
    result = LoopAnalysis(target.label, target.step, depth, position, (B, T))
    try:
        if jacobian:
            result.jacobian = loop_jacobian(model, batch.tokens, depth, position=position, h0=batch.h0, k=k)
        if lyapunov:
            result.lyapunov = loop_lyapunov(model, batch.tokens, depth, k=k, position=position, h0=batch.h0)
    except (ValueError, RuntimeError) as err:
        result.error = str(err)
    return result


def record(run: Run, results: list[LoopAnalysis]) -> None:
    """Write analyses into `run` (RunWriter.attach: status and history untouched) under the
    probe's names; one that failed becomes a `probe_error` event, as in the trainer."""
    with RunWriter.attach(run.path) as writer:
        for r in results:
            if r.error:
                writer.log_event(r.step, records.PROBE_ERROR, f"analyze: {r.error}")
            if r.jacobian:
                writer.log_analysis(records.JACOBIAN_RADIUS, r.step, r.jacobian.radius)
                writer.log_analysis(records.JACOBIAN_MODULI, r.step, np.abs(r.jacobian.eigenvalues))
            if r.lyapunov:
                writer.log_analysis(records.LYAPUNOV, r.step, r.lyapunov.exponents)
        last = results[-1]
        writer.save_result("analyze", {"steps": [r.step for r in results], "depth": last.depth,
                                       "position": last.position, "batch": list(last.batch)})


__all__ = ["LoopAnalysis", "analyze", "record"]
