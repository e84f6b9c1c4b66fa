"""What the trainer measures, and how often.

Every step (cheap; the trainer logs them):
    grad_norms       ‖∇‖ per parameter role (optim.ROLES) and in total
    state_norms      max and mean per-token ‖h_T‖ of the step's final recurrent state

Every N steps, on a fixed probe batch (validation windows) with a fixed h_0, under
torch.no_grad and touching no RNG that training uses (`Probes.run`):
    trace            LoopTrace over iterations t = 1..T at trace_depth (model(..., trace=True))
    spectrum         every eigenvalue of Ā, ρ(Ā) = max|λ|, ‖Ā‖₂, ‖B̄‖₂, ‖C‖₂ and the prelude
                     output norm ‖e‖ (mean per token: the late-explosion signal)
Every M steps (off by default), on the same batch, state and depth (`analysis_probe`):
    the loop as a dynamical system (stabilitylab.analysis), at the last position (the
    per-token view: the block ∂F[p]/∂h[p] of the B sequences, n = B · d_state):
    jacobian_radius  ρ(∂F/∂h) at h_T, and the moduli of its ANALYSIS_K leading eigenvalues
    lyapunov         the ANALYSIS_K leading Lyapunov exponents along h_0 → h_T

So probes on or off leave the loss curve bit for bit the same (a test checks it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from stabilitylab import records
from stabilitylab.analysis import eigenvalues, loop_jacobian, loop_lyapunov, spectral_norm
from stabilitylab.config import ProbeConfig, resolve_depth
from stabilitylab.data import Corpus
from stabilitylab.model import LoopedLM
from stabilitylab.store import RunWriter



def grad_norms(roles: dict[str, list[torch.nn.Parameter]], device: torch.device) -> dict[str, Tensor]:
    """‖∇‖₂ of each role's gradients (0 for a role without any), on the device."""
    out = {}
    for role, params in roles.items():
        grads = [p.grad for p in params if p.grad is not None]
        out[role] = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    return out


def state_norms(state: Tensor) -> tuple[Tensor, Tensor]:
    """(max, mean) over tokens of the per-token ‖h_T‖ (norm over the state channels)."""
    norms = state.detach().float().norm(dim=-1)
    return norms.max(), norms.mean()


@dataclass
class Spectrum:
    """The injection's linear part at one step."""

    eigenvalues: Tensor  # complex128, every eigenvalue of Ā
    rho: float  # ρ(Ā) = max |λ|
    norm_a: float  # ‖Ā‖₂
    norm_b: float  # ‖B̄‖₂
    norm_c: float  # ‖C‖₂ (the readout)


@torch.no_grad()
def injection_spectrum(model: LoopedLM) -> Spectrum:
    """Eigenvalues and norms of Ā, B̄ and C in float64 (stabilitylab.analysis.spectra for Ā:
    a diagonal Ā is its own eigenvalues). A non-finite Ā has no spectrum: NaN throughout."""
    A = model.injection.transition().detach().cpu()
    B = model.injection.input_matrix().detach().double().cpu()
    C = model.readout.weight.detach().double().cpu()
    norm_b, norm_c = (float(torch.linalg.matrix_norm(M, 2)) for M in (B, C))
    if not torch.isfinite(A).all():
        return Spectrum(torch.empty(0, dtype=torch.complex128), math.nan, math.nan, norm_b, norm_c)
    lam = eigenvalues(A)  # sorted by modulus, descending
    return Spectrum(lam, float(lam[0].abs()), spectral_norm(A), norm_b, norm_c)


def analysis_probe(model: LoopedLM, tokens: Tensor, h0: Tensor, depth: int, step: int, writer: RunWriter) -> None:
    """The Jacobian spectrum and Lyapunov exponents of the loop at the last position, logged
    with writer.log_analysis. A loop whose state has overflowed has neither: the reason is
    logged as a `probe_error` event instead (stabilitylab.analysis refuses non-finite states)."""
    k = min(records.ANALYSIS_K, h0.shape[0] * h0.shape[-1])
    try:
        jacobian = loop_jacobian(model, tokens, depth, position=-1, h0=h0, k=k)
        lyapunov = loop_lyapunov(model, tokens, depth, k=k, position=-1, h0=h0)
    except (ValueError, RuntimeError) as err:
        writer.log_event(step, records.PROBE_ERROR, f"analysis: {err}")
        return
    writer.log_analysis(records.JACOBIAN_RADIUS, step, jacobian.radius)
    writer.log_analysis(records.JACOBIAN_MODULI, step, np.abs(jacobian.eigenvalues))
    writer.log_analysis(records.LYAPUNOV, step, lyapunov.exponents)


class Probes:
    """The periodic probes of one run: a fixed probe batch and its cadences."""

    def __init__(self, cfg: ProbeConfig, model: LoopedLM, corpus: Corpus, seq_len: int, seed: int,
                 device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager]):
        self.cfg, self.autocast = cfg, autocast
        self.looped = model.cfg.looped
        self.depth = resolve_depth(cfg.trace_depth, model.cfg.mean_recurrence)
        x, _ = corpus.val_batches(1, cfg.batch_size, seq_len)[0]
        self.tokens = x.to(device)
        generator = torch.Generator(device=device).manual_seed(seed ^ records.PROBE_SALT)
        self.h0 = model.draw_state(tuple(x.shape), device, torch.float32, generator)

    def due(self, step: int) -> bool:
        every = (self.cfg.trace_every, self.cfg.spectrum_every, self.cfg.analysis_every)
        return self.looped and any(n and step % n == 0 for n in every)

    @torch.no_grad()
    def run(self, step: int, model: LoopedLM, writer: RunWriter, force: bool = False) -> float | None:
        """Run the probes due at `step` and log them; force=True (a divergence) runs the
        trace and the spectrum whatever their cadence, and the analysis if it is on. The
        model's train/eval mode is restored. Returns ρ(Ā) when the spectrum ran."""
        if not self.looped:
            return None
        cfg, rho, e_norm = self.cfg, None, None
        was_training = model.training
        model.eval()
        try:
            if force or (cfg.trace_every and step % cfg.trace_every == 0):
                with self.autocast():
                    out = model(self.tokens, depth=self.depth, h0=self.h0, trace=True)
                trace = out.trace.to_dict()
                e_norm = trace[records.E_NORM_MEAN]
                writer.log_trace(step, trace)
            if force or (cfg.spectrum_every and step % cfg.spectrum_every == 0):
                if e_norm is None:
                    with self.autocast():
                        e_norm = float(model.encode(self.tokens).float().norm(dim=-1).mean())
                s = injection_spectrum(model)
                writer.log_spectrum(step, s.eigenvalues.numpy(), **{
                    records.RHO: s.rho, records.NORM_A: s.norm_a, records.NORM_B: s.norm_b, records.NORM_C: s.norm_c,
                    records.NORM_E: e_norm})
                rho = s.rho
            if cfg.analysis_every and (force or step % cfg.analysis_every == 0):
                analysis_probe(model, self.tokens, self.h0, self.depth, step, writer)
        finally:
            model.train(was_training)
        return rho


__all__ = ["grad_norms", "state_norms", "Spectrum", "injection_spectrum", "analysis_probe", "Probes"]
