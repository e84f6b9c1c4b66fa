"""What the trainer measures, and how often.

Every step, recorded through the trainer's LoopMonitor (stabilitylab.monitor: the code
path of a user's own loop, so both record the same numbers):
    grad_norms       ‖∇‖ per parameter role (optim.ROLES) and in total
    state_norms      max and mean per-token ‖h_T‖ of the step's final recurrent state
    radius estimate  ρ(∂F/∂h) at the training forward's h_T, warm-started (probes.radius_every; off
                     by default) and the contraction rate of its own trace (probes.rate_every; off)

Every N steps, on a fixed probe batch (validation windows) with a fixed h_0, under
torch.no_grad and touching no RNG that training uses (`Probes.run`):
    trace            LoopTrace over iterations t = 1..T at trace_depth (the loop only: loop_trace)
    spectrum         every eigenvalue of Ā, ρ(Ā) = max|λ|, ‖Ā‖₂, ‖B̄‖₂, ‖C‖₂ and the prelude
                     output norm ‖e‖ (mean per token: the late-explosion signal)
Every M steps (off by default), on the same batch, state and depth (`analysis_probe`):
    the loop as a dynamical system (stabilitylab.analysis), at the last position (the
    per-token view: the block ∂F[p]/∂h[p] of the B sequences, n = B · d_state; the
    Jacobian by the cheaper of a dense per-sequence form and Krylov):
    jacobian_radius  ρ(∂F/∂h) at h_T, and the moduli of its ANALYSIS_K leading eigenvalues
    lyapunov         the ANALYSIS_K leading Lyapunov exponents along h_0 → h_T

So probes on or off leave the loss curve bit for bit the same (a test checks it).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from stabilitylab import records
from stabilitylab.analysis import jacobian_spectral_radius
from stabilitylab.analysis.estimate import last_position_map
from stabilitylab.analysis.maps import batched_jvp, checked_map, math_attention, orthonormal_rows, work_dtype
from stabilitylab.config import ProbeConfig, resolve_depth
from stabilitylab.data import Corpus
from stabilitylab.model import Depth, LoopedLM, LoopTrace
from stabilitylab.model.looped import _TraceRecorder
from stabilitylab.monitor import Spectrum, injection_spectrum, state_norms
from stabilitylab.store import RunWriter

DENSE_MAX_BLOCK = 256  # analysis probe: dense per-sequence Jacobian blocks up to this d_state, Krylov beyond


def grad_norms(roles: dict[str, list[torch.nn.Parameter]], device: torch.device) -> dict[str, Tensor]:
    """‖∇‖₂ of each role's gradients (0 for a role without any), on the device."""
    out = {}
    for role, params in roles.items():
        grads = [p.grad for p in params if p.grad is not None]
        out[role] = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    return out


def loop_trace(model: LoopedLM, tokens: Tensor, depth: int, h0: Tensor) -> LoopTrace:
    """The LoopTrace of model(tokens, depth=depth, h0=h0, trace=True), without the coda and
    the head that the forward would run after the loop (the same numbers, bit for bit). It
    uses LoopedLM's own loop function and trace recorder, not the interface's loop_map: that
    one runs attention on the math kernel (for JVPs), which the forward does not, so its
    trace would differ from the forward's at float rounding."""
    e = model.encode(tokens)
    recorder = _TraceRecorder(e, h0)
    model.loop(model._loop_fn(e, tokens), h0, Depth(depth, 0), recorder)
    return recorder.result()


def last_position_lyapunov(step: Callable, h0: Tensor, steps: int, k: int, seed: int = 0) -> tuple[np.ndarray, Tensor]:
    """(the k leading Lyapunov exponents, h_steps) of the orbit h_{t+1} = F(h_t) from h0, for
    the per-token cocycle ∂F(h_t)[p]/∂h[p] at the last position: Benettin's QR method
    (stabilitylab.analysis.lyapunov, the same start frame and order, so the same numbers as
    loop_lyapunov(position=-1) to float rounding), its k JVPs per step through g_t of
    last_position_map."""
    B, _, d = h0.shape
    work = work_dtype(h0)
    Q = orthonormal_rows(B * d, k, seed).to(device=h0.device, dtype=work)  # (k, B·d), rows orthonormal
    h, logs = h0, []
    for t in range(steps):
        h_next, g = step(h)
        if not bool(torch.isfinite(h_next).all()):
            raise ValueError(f"the orbit left the finite numbers at step {t + 1}: f(h) has non-finite entries")
        _, Z = batched_jvp(g, h[:, -1], Q.to(h.dtype).view(k, B, d))
        Qt, R = torch.linalg.qr(Z.reshape(k, B * d).to(work).T)
        Q, h = Qt.T, h_next
        logs.append(R.diagonal().abs().double().log())
    mean = torch.stack(logs).mean(0).cpu()
    return mean.sort(descending=True, stable=True).values.numpy(), h


def last_position_eigenvalues(g: Callable[[Tensor], Tensor], x: Tensor, k: int) -> np.ndarray:
    """The k leading eigenvalues of the Jacobian of g (a last-position map, x = h[:, −1] of
    shape (B, d)), by modulus (complex128), picking the cheaper method.

    Sequences do not interact, so that (B·d)-dimensional Jacobian is block diagonal, one
    d × d block J_b per sequence, and its eigenvalues are the union of the blocks'. Dense:
    d JVPs in one vmapped call, each pushing the unit vector eᵢ through every sequence at
    once (column i of every J_b), then B small eigenproblems in float64. Krylov
    (stabilitylab.analysis, block Arnoldi on the whole B·d state) spends about 350 JVPs
    for k = 8 at B·d = 256 (measured), so dense wins up to d = DENSE_MAX_BLOCK, Krylov beyond.
    """
    checked_map(g, x)
    B, d = x.shape
    if d > DENSE_MAX_BLOCK:
        return jacobian_spectral_radius(g, x, k=k, method="krylov").eigenvalues
    units = torch.eye(d, dtype=x.dtype, device=x.device)[:, None, :].expand(d, B, d)
    columns = batched_jvp(g, x, units)[1]  # (d, B, d): J_b eᵢ
    lam = torch.linalg.eigvals(columns.permute(1, 2, 0).double()).flatten().cpu()
    lam = lam[torch.argsort(lam.imag, descending=True, stable=True)]  # conjugate pairs: + before −
    return lam[torch.argsort(lam.abs(), descending=True, stable=True)][:k].numpy()


@torch.no_grad()
def analysis_probe(model: LoopedLM, tokens: Tensor, h0: Tensor, depth: int, step: int, writer: RunWriter) -> None:
    """The Lyapunov exponents along h_0 → h_T and the Jacobian spectrum at h_T of the loop at
    the last position (one orbit, last_position_map), logged with writer.log_analysis. A loop
    whose state has overflowed has neither: the reason is logged as a `probe_error` event."""
    k = min(records.ANALYSIS_K, h0.shape[0] * h0.shape[-1])
    try:
        if not bool(torch.isfinite(h0).all()):
            raise ValueError("the state has non-finite entries")
        with math_attention():
            loop = last_position_map(model, tokens)
            exponents, h = last_position_lyapunov(loop, h0, depth, k)
            lam = last_position_eigenvalues(loop(h)[1], h[:, -1], k)
    except (ValueError, RuntimeError) as err:
        writer.log_event(step, records.PROBE_ERROR, f"analysis: {err}")
        return
    writer.log_analysis(records.JACOBIAN_RADIUS, step, float(np.abs(lam[0])))
    writer.log_analysis(records.JACOBIAN_MODULI, step, np.abs(lam))
    writer.log_analysis(records.LYAPUNOV, step, exponents)


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
                    trace = loop_trace(model, self.tokens, self.depth, self.h0).to_dict()
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


__all__ = ["grad_norms", "state_norms", "loop_trace", "Spectrum", "injection_spectrum", "last_position_map",
           "last_position_lyapunov", "last_position_eigenvalues", "analysis_probe", "Probes"]
