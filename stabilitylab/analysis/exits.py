"""Adaptive exit, measured on any loop model (model/interface.py): when may a token stop
iterating, what does stopping cost in loss, and does the loop's contraction predict it?

The loop runs to `max_depth` D, keeping every state h_0..h_D and readout p_t = softmax(decode(h_t)).
A token exits at the first t ≥ 1 where its criterion falls below the threshold (else at D):

    latent    ‖h_t − h_{t−1}‖ / ‖h_t‖ < ε                    (Huginn's latent difference)
    kl        KL(p_t ‖ p_{t−1}) < ε                           (Huginn's default, KL of successive readouts)
    entropy   |H(p_t) − H(p_{t−1})| < ε
    argmax    argmax p has not changed for the last k = ε steps (t ≥ k)
    gate      Σ_{s≤t} p_s ≥ ε, p_s = λ_s ∏_{j<s} (1 − λ_j), λ_s = exit_probability(h_s)   (Ouro's
              learned gate; only when the model has `exit_probability`)

The gate's exit distribution is Ouro's own: over the trained steps 1..n, n = μ_rec
(total_ut_steps), the last one taking what is left (p_n = ∏_{j<n}(1 − λ_j)), so the
cumulative probability is 1 at n and every token exits by n, whatever D; it is summed in
float32 in the authors' order (p_s, then a running sum), so their float rounding carries
over too (at ε = 1.0, their default, a token may exit before n once the float sum rounds
to 1).

Per criterion and threshold: mean exit depth and the loss (cross-entropy of the exit readout
against the next token). Against the reference, the loss at the model's own depth μ_rec,
`saved(δ)` = 1 − (smallest mean depth with loss ≤ L(μ_rec) + δ) / μ_rec.

Prediction (latent rule). A loop that contracts at rate q < 1 shrinks its residual
r_t = ‖h_t − h_{t−1}‖ geometrically, r_t ≈ q^{t−1} r_1, so from the relative residual
r₀ := r_1/‖h_1‖ it reaches ε after ⌈log(ε/r₀)/log q⌉ more steps:

    t_pred = 1 + max(0, ⌈log(ε / r₀) / log q⌉),   q = r_2 / r_1 (the trace's residual ratio)

(q ≥ 1: no exit predicted, t_pred = D). It is exact for h ↦ a·h + b with a scalar per token
when ‖h_t‖ stays put (the fixed point dominates the state); elsewhere its error is what
`ExitPrediction` reports (Pearson r of predicted vs measured, median |error|, fraction exact).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import Tensor

from stabilitylab import records
from stabilitylab.model.interface import LoopModel

CRITERIA = ("latent", "kl", "entropy", "argmax", "gate")
DEFAULT_EPS = {"latent": (0.3, 0.1, 0.03, 0.01, 0.003, 0.001), "kl": (0.1, 0.03, 0.01, 0.003, 0.001, 5e-4, 1e-4),
               "entropy": (0.1, 0.03, 0.01, 0.003, 0.001), "argmax": (1, 2, 3, 4),
               "gate": (0.5, 0.7, 0.9, 0.95, 0.99)}
DELTAS = (0.0, 0.01, 0.05)


@dataclass
class ExitPoint:
    """One threshold of one criterion: mean/max exit depth over tokens and the loss there."""

    eps: float
    mean_depth: float
    max_depth: int
    loss: float


@dataclass
class ExitCurve:
    """A criterion's loss-vs-depth curve and the compute saved at loss increase ≤ δ (None: no
    threshold within δ)."""

    criterion: str
    points: list[ExitPoint]
    saved: dict[float, float | None] = field(default_factory=dict)


@dataclass
class ExitPrediction:
    """Predicted vs measured latent-rule exit depth at threshold eps, per token (flattened B·T):
    tokens with q ≥ 1 or no exit by D predict D. corr: Pearson r (nan when constant)."""

    eps: float
    predicted: list[int]
    measured: list[int]
    rate: list[float]
    corr: float
    median_abs_error: float
    exact: float  # fraction of tokens predicted exactly


@dataclass
class ExitReport:
    """What `stabilitylab exit` prints and records (torchdeq-style plain stats)."""

    target: str
    step: int | None
    max_depth: int
    mu_rec: int
    batch: tuple[int, int]
    loss_by_depth: list[float]  # loss of the readout at t = 1..D (no exit)
    reference_loss: float  # at μ_rec (or D when shorter)
    curves: list[ExitCurve]
    predictions: list[ExitPrediction]
    skipped: dict[str, str] = field(default_factory=dict)  # criterion → why not measured

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch"] = list(self.batch)
        for c in d["curves"]:
            c["saved"] = {str(k): v for k, v in c["saved"].items()}
        return d

    def text(self) -> str:
        B, T = self.batch
        lines = [f"{self.target}: max depth {self.max_depth}, μ_rec {self.mu_rec}, batch {B}×{T}, "
                 f"L(μ_rec) = {self.reference_loss:.4f}, L(D) = {self.loss_by_depth[-1]:.4f}"]
        for c in self.curves:
            saved = "  ".join(f"δ={d:g}: " + ("—" if s is None else f"{100 * s:.0f}%") for d, s in c.saved.items())
            lines.append(f"  {c.criterion:<8} saved vs μ_rec  {saved}")
            lines.append(f"    {'eps':>8} {'mean t':>7} {'max t':>6} {'L':>8}")
            lines += [f"    {p.eps:8.3g} {p.mean_depth:7.2f} {p.max_depth:6d} {p.loss:8.4f}" for p in c.points]
        for p in self.predictions:
            lines.append(f"  predicted vs measured (latent, ε={p.eps:g}): r = {p.corr:.3f}, median |err| = "
                         f"{p.median_abs_error:.2f}, exact {100 * p.exact:.0f}%, mean t pred "
                         f"{np.mean(p.predicted):.2f} meas {np.mean(p.measured):.2f}")
        lines += [f"  {name}: not measured ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class Rollout:
    """The loop run to D: per-token statistics, each (D, N) over t = 1..D and N = B·T tokens."""

    latent: Tensor  # ‖h_t − h_{t−1}‖ / ‖h_t‖
    residual: Tensor  # ‖h_t − h_{t−1}‖
    kl: Tensor
    entropy: Tensor  # |H_t − H_{t−1}|
    argmax: Tensor  # (D+1, N) argmax p_t, t = 0..D
    nll: Tensor  # −log p_t(next token)
    gate: Tensor | None  # cumulative exit probability, or None without a gate


@torch.no_grad()
def rollout(model: LoopModel, tokens: Tensor, targets: Tensor, depth: int, h0: Tensor | None = None) -> Rollout:
    """Run the loop D = depth steps through the interface, reading out every state."""
    e = model.encode(tokens)
    F = model.loop_map(e, tokens)
    h = model.initial_state(e) if h0 is None else h0
    gate_fn = getattr(model, "exit_probability", None)
    y = targets.reshape(-1)

    def read(h: Tensor) -> Tensor:
        return Fn.log_softmax(model.decode(h, tokens).float().reshape(-1, model.vocab_size), -1)

    logp = read(h)
    cols: dict[str, list[Tensor]] = {k: [] for k in ("latent", "residual", "kl", "entropy", "nll", "gate")}
    argmax = [logp.argmax(-1)]
    remaining = torch.ones_like(y, dtype=torch.float32)
    cumulative = torch.zeros_like(remaining)
    for t in range(1, depth + 1):
        h_new = F(h)
        r = (h_new - h).float().reshape(-1, h.shape[-1]).norm(dim=-1)
        cols["residual"].append(r)
        cols["latent"].append(r / h_new.float().reshape(-1, h.shape[-1]).norm(dim=-1).clamp_min(1e-30))
        new = read(h_new)
        p = new.exp()
        cols["kl"].append((p * (new - logp)).sum(-1).clamp_min(0))
        ent_new, ent_old = -(p * new).sum(-1), -(logp.exp() * logp).sum(-1)
        cols["entropy"].append((ent_new - ent_old).abs())
        cols["nll"].append(-new.gather(-1, y[:, None])[:, 0])
        argmax.append(new.argmax(-1))
        if gate_fn is not None:  # Ouro's exit distribution (module docstring): step μ_rec takes the rest
            if t < model.mu_rec:
                lam = gate_fn(h_new).float().reshape(-1)
                cumulative = cumulative + lam * remaining
                remaining = remaining * (1 - lam)
            else:
                cumulative = torch.ones_like(cumulative)
            cols["gate"].append(cumulative)
        h, logp = h_new, new
    stack = {k: torch.stack(v) if v else None for k, v in cols.items()}
    return Rollout(stack["latent"], stack["residual"], stack["kl"], stack["entropy"], torch.stack(argmax),
                   stack["nll"], stack["gate"])


def first_true(hit: Tensor) -> Tensor:
    """(D, N) bool → the first t (1-based) where it is True per column, D where never."""
    D = hit.shape[0]
    t = torch.arange(1, D + 1)[:, None].expand_as(hit)
    return torch.where(hit, t, torch.full_like(t, D)).min(0).values


def exit_depths(roll: Rollout, criterion: str, eps: float) -> Tensor:
    """(N,) exit depth per token under one criterion and threshold (module docstring)."""
    if criterion in ("latent", "kl", "entropy"):
        return first_true(getattr(roll, criterion) < eps)
    if criterion == "argmax":
        k, D = int(eps), roll.nll.shape[0]
        if k < 1:
            raise ValueError(f"argmax needs k ≥ 1 steps, got {eps}")
        same = (roll.argmax[1:] == roll.argmax[:-1]).int()  # (D, N): argmax_t == argmax_{t−1}
        run = torch.zeros_like(same)
        for t in range(D):
            run[t] = (run[t - 1] + 1) * same[t] if t else same[t]
        return first_true(run >= k)
    if criterion == "gate":
        if roll.gate is None:
            raise ValueError("the model has no exit gate (exit_probability)")
        return first_true(roll.gate >= eps)
    raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")


def exit_loss(roll: Rollout, depths: Tensor) -> float:
    """Mean cross-entropy of each token's readout at its exit depth."""
    return float(roll.nll.gather(0, (depths - 1)[None])[0].mean())


def predict_latent(roll: Rollout, eps: float) -> tuple[Tensor, Tensor]:
    """(t_pred, q) per token from the first two residuals (module docstring); needs D ≥ 2."""
    D = roll.residual.shape[0]
    r1, r2 = roll.residual[0].double(), roll.residual[1].double()
    q = r2 / r1.clamp_min(1e-300)
    r0 = roll.latent[0].double()
    steps = torch.ceil(torch.log(eps / r0.clamp_min(1e-300)) / torch.log(q.clamp(1e-300, 1 - 1e-12)))
    t = 1 + steps.clamp_min(0)
    t = torch.where((q < 1) & (r0 > 0), t, torch.full_like(t, D))
    t = torch.where(r0 < eps, torch.ones_like(t), t)
    return t.clamp(1, D).long(), q.float()


def prediction(roll: Rollout, eps: float) -> ExitPrediction:
    pred, q = predict_latent(roll, eps)
    meas = exit_depths(roll, "latent", eps)
    p, m = pred.numpy().astype(float), meas.numpy().astype(float)
    corr = float(np.corrcoef(p, m)[0, 1]) if p.std() > 0 and m.std() > 0 else float("nan")
    return ExitPrediction(eps, pred.tolist(), meas.tolist(), q.tolist(), corr, float(np.median(np.abs(p - m))),
                          float(np.mean(p == m)))


def measure(model: LoopModel, tokens: Tensor, targets: Tensor, max_depth: int | None = None,
            criteria: tuple[str, ...] = CRITERIA, eps: dict[str, tuple[float, ...]] | None = None,
            deltas: tuple[float, ...] = DELTAS, h0: Tensor | None = None, target: str = "model",
            step: int | None = None) -> ExitReport:
    """The exit report of a model on (tokens, targets): default max_depth 2·μ_rec, every
    criterion at DEFAULT_EPS (the gate only where the model has one)."""
    mu = int(model.mu_rec)
    D = max(2, 2 * mu) if max_depth is None else max_depth
    if D < 2:
        raise ValueError(f"max_depth must be ≥ 2 (the prediction needs two residuals), got {D}")
    roll = rollout(model, tokens, targets, D, h0)
    by_depth = roll.nll.mean(1).tolist()
    ref = by_depth[min(mu, D) - 1]
    curves, skipped = [], {}
    for name in criteria:
        if name == "gate" and roll.gate is None:
            skipped[name] = "the model has no exit gate (exit_probability)"
            continue
        points = []
        for x in (eps or {}).get(name, DEFAULT_EPS[name]):
            d = exit_depths(roll, name, x)
            points.append(ExitPoint(float(x), float(d.float().mean()), int(d.max()), exit_loss(roll, d)))
        saved = {}
        for delta in deltas:
            ok = [p.mean_depth for p in points if p.loss <= ref + delta]
            saved[delta] = 1 - min(ok) / mu if ok else None
        curves.append(ExitCurve(name, points, saved))
    latent_eps = (eps or {}).get("latent", DEFAULT_EPS["latent"])
    predictions = [prediction(roll, x) for x in latent_eps] if "latent" in criteria else []
    return ExitReport(target, step, D, mu, tuple(tokens.shape), by_depth, ref, curves, predictions, skipped)


def record(run, reports: list[ExitReport]) -> None:
    """Write exit reports into a run (RunWriter.attach: status and history untouched): the
    arrays under records.EXIT_ARRAYS at each checkpoint step, the last report as the result."""
    from stabilitylab.store import RunWriter

    with RunWriter.attach(run.path) as writer:
        for r in reports:
            writer.log_analysis(records.EXIT_LOSS_BY_DEPTH, r.step, r.loss_by_depth)
            if r.predictions:
                writer.log_analysis(records.EXIT_PRED_CORR, r.step, [p.corr for p in r.predictions])
                writer.log_analysis(records.EXIT_PRED_ERROR, r.step, [p.median_abs_error for p in r.predictions])
        writer.save_result(records.EXIT_RESULT, reports[-1].to_dict())


__all__ = ["CRITERIA", "DEFAULT_EPS", "DELTAS", "ExitPoint", "ExitCurve", "ExitPrediction", "ExitReport",
           "Rollout", "rollout", "first_true", "exit_depths", "exit_loss", "predict_latent", "prediction", "measure", "record"]
