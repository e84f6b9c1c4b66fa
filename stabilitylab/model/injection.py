"""How the prompt enters the loop: h ↦ Ā h + B̄ e (docs/parcae.md §1).

Every injection is linear in (h, e), so it is described by two matrices:

    transition()    Ā, a (d_state,) diagonal or a (d_state, d_state) dense matrix
    input_matrix()  B̄, (d_state, d_model)

The loop evaluates it in two parts so that nothing constant is recomputed per
iteration: `drive(e)` = B̄ e once per forward, then `step(h, Ā, u)` = Ā h + u on every
iteration. The linearised loop h ← Ā h + B̄ e is stable iff ρ(Ā) < 1; it then
converges to the fixed point (I − Ā)⁻¹ B̄ e.

| name          | Ā                                  | B̄                       | ρ(Ā)          |
|---------------|------------------------------------|--------------------------|---------------|
| add           | I                                  | I                        | = 1           |
| concat        | W₁ (free)                          | W₂                       | unconstrained |
| free-diagonal | diag(a), a free                    | B (free)                 | unconstrained |
| parcae        | exp(−Δ ⊙ exp(A_log))               | Δ ⊙ B (Euler)            | < 1           |
| parcae-zoh    | same                               | (1 − Ā)/a ⊙ B (exact ZOH)| < 1           |
| stable-dense  | exp(D½ (−diag(a) − LLᵀ + S − Sᵀ) D½)| Δ ⊙ B                   | < 1, mixes    |
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabilitylab.config import ModelConfig


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _identity_or_orthogonal(rows: int, cols: int) -> Tensor:
    """I when square, else a random orthogonal matrix (the reference's B init)."""
    if rows == cols:
        return torch.eye(rows)
    return nn.init.orthogonal_(torch.empty(rows, cols))


def _init_decay_rates(module: nn.Module, cfg: ModelConfig) -> None:
    """The decay rates of Parcae and StableDense, as the reference initialises them:
    A_log = 0 (a = 1) and dt_bias such that Δ = softplus(dt_bias) = −log(injection_decay),
    so that every channel starts at Ā = exp(−Δ a) = injection_decay."""
    d = cfg.state_dim
    module.A_log = nn.Parameter(torch.zeros(d))
    module.dt_bias = nn.Parameter(torch.full((d,), _inverse_softplus(-math.log(cfg.injection_decay))))


class Injection(nn.Module):
    """Base class: subclasses define `transition()` and `input_matrix()`."""

    def transition(self) -> Tensor:
        raise NotImplementedError

    def input_matrix(self) -> Tensor:
        raise NotImplementedError

    def drive(self, e: Tensor) -> Tensor:
        """u = B̄ e for e of shape (..., d_model)."""
        return e @ self.input_matrix().mT

    def step(self, h: Tensor, A: Tensor, u: Tensor) -> Tensor:
        """Ā h + u, for a diagonal (vector) or dense Ā."""
        return torch.addcmul(u, h, A) if A.ndim == 1 else h @ A.mT + u

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return self.step(h, self.transition(), self.drive(e))

    def reset_buffers(self) -> None:
        """Recompute constant buffers (after a build on the meta device); most have none."""


class Add(Injection):
    """h + e: the plain looped transformer. Ā = I, so ρ = 1 exactly: marginally stable."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("ones", torch.ones(cfg.state_dim), persistent=False)

    def reset_buffers(self) -> None:
        self.ones.fill_(1.0)

    def transition(self) -> Tensor:
        return self.ones

    def input_matrix(self) -> Tensor:
        return torch.diag(self.ones)

    def drive(self, e: Tensor) -> Tensor:
        return e

    def step(self, h: Tensor, A: Tensor, u: Tensor) -> Tensor:
        return h + u


class Concat(Injection):
    """W [h; e] (Huginn / recurrent-depth models): Ā = W₁ = W[:, :d_state] and
    B̄ = W₂ = W[:, d_state:] are free, so ρ(Ā) can grow past 1.
    Init: truncated normal, std √(2/(5·d_model)), so ρ(W₁) ≈ √(2/5) ≈ 0.63."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_state = cfg.state_dim
        std = math.sqrt(2 / (5 * cfg.d_model))
        self.W = nn.Parameter(nn.init.trunc_normal_(torch.empty(cfg.state_dim, cfg.state_dim + cfg.d_model),
                                                    std=std, a=-3 * std, b=3 * std))

    def transition(self) -> Tensor:
        return self.W[:, : self.d_state]

    def input_matrix(self) -> Tensor:
        return self.W[:, self.d_state:]


class Parcae(Injection):
    """Parcae's injection: a negative diagonal A = −exp(A_log), discretised with step
    Δ = softplus(dt_bias) by zero-order hold, Ā = exp(ΔA), and Euler for the input,
    B̄ = Δ ⊙ B. Since Δ > 0 and exp(A_log) > 0, every entry of Ā is exp(−positive) < 1:
    ρ(Ā) < 1 for every parameter value, in exact arithmetic. (In float32 exp(−x)
    rounds to 1.0 for x ≲ 6e-8, in bfloat16 for x ≲ 4e-3: see analysis.bounds.)

    Init (reference): A_log = 0, Δ such that Ā = `injection_decay` = √(1/5), B = I
    (orthogonal when d_state ≠ d_model).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _init_decay_rates(self, cfg)
        self.B = nn.Parameter(_identity_or_orthogonal(cfg.state_dim, cfg.d_model))

    def rates(self) -> tuple[Tensor, Tensor]:
        """(Δ, a) with Δ = softplus(dt_bias) and a = exp(A_log): Ā = exp(−Δ a)."""
        return F.softplus(self.dt_bias), torch.exp(self.A_log)

    def log_transition(self) -> Tensor:
        """log Ā = −Δ·a, strictly negative whenever Δ and a are: the margin below ρ = 1
        that exp() may round away in low precision."""
        dt, a = self.rates()
        return -dt * a

    def transition(self) -> Tensor:
        return torch.exp(self.log_transition())

    def input_scale(self) -> Tensor:
        """Per-channel factor of B̄ = scale ⊙ B: Euler uses Δ."""
        return F.softplus(self.dt_bias)

    def input_matrix(self) -> Tensor:
        return self.input_scale()[:, None] * self.B

    def drive(self, e: Tensor) -> Tensor:
        return self.input_scale() * (e @ self.B.mT)  # the reference's order: Δ · (e Bᵀ)


class ParcaeZOH(Parcae):
    """Parcae with the exact zero-order-hold input matrix:
        B̄ = (∫₀^Δ e^{−a s} ds) B = ((1 − e^{−Δa}) / a) ⊙ B = (−expm1(−Δa) / a) ⊙ B,
    computed with expm1 so that it stays accurate when Δa is tiny (where 1 − e^{−Δa}
    would cancel to 0). It tends to Euler's Δ as Δa → 0."""

    def input_scale(self) -> Tensor:
        dt, a = self.rates()
        return -torch.expm1(-dt * a) / a


class FreeDiagonal(Injection):
    """A learned diagonal Ā = diag(a) with no constraint and a free B̄ = B: the
    unconstrained counterpart of Parcae, so that ρ = max|a| can pass 1. It starts as
    the same function as Parcae's init (a = injection_decay, B̄ = Δ₀ I)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.state_dim
        dt0 = -math.log(cfg.injection_decay)
        self.a = nn.Parameter(torch.full((d,), cfg.injection_decay))
        self.B = nn.Parameter(dt0 * _identity_or_orthogonal(d, cfg.d_model))

    def transition(self) -> Tensor:
        return self.a

    def input_matrix(self) -> Tensor:
        return self.B


class StableDense(Injection):
    """A dense, cross-channel Ā with ρ(Ā) < 1 by construction.

    Continuous-time generator  A = −diag(a) − L Lᵀ + (S − Sᵀ),  a = exp(A_log) > 0:
    its symmetric part −diag(a) − LLᵀ is negative definite (dissipation) and S − Sᵀ is
    skew (rotation, the cross-channel mixing). Discretise with per-channel steps
    Δ = softplus(dt_bias) symmetrically, M = D½ A D½ with D = diag(Δ), Ā = exp(M).
    Congruence by D½ keeps the skew part skew, so for any unit vector x

        xᵀ M x = −Σᵢ Δᵢ aᵢ xᵢ² − ‖Lᵀ D½ x‖² ≤ −minᵢ Δᵢ aᵢ =: −γ < 0.

    The logarithmic-norm bound ‖exp(M)‖₂ ≤ exp(λ_max((M + Mᵀ)/2)) then gives

        ρ(Ā) ≤ ‖Ā‖₂ ≤ exp(−γ) < 1

    for every parameter value. With L = S = 0 it is exactly Parcae (Ā = exp(−Δa)),
    which is the init up to a small random L (LLᵀ has zero gradient at L = 0).
    B̄ = Δ ⊙ B (Euler), as Parcae. Cost: one d×d matrix exponential per forward.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.state_dim
        _init_decay_rates(self, cfg)
        self.L = nn.Parameter(torch.randn(d, d) * (0.1 / math.sqrt(d)))
        self.S = nn.Parameter(torch.zeros(d, d))
        self.B = nn.Parameter(_identity_or_orthogonal(d, cfg.d_model))

    def generator(self) -> Tensor:
        """M = D½ (−diag(a) − LLᵀ + S − Sᵀ) D½, the discretised generator: Ā = exp(M)."""
        a, sqrt_dt = torch.exp(self.A_log), F.softplus(self.dt_bias).sqrt()
        A = -torch.diag(a) - self.L @ self.L.mT + (self.S - self.S.mT)
        return sqrt_dt[:, None] * A * sqrt_dt[None, :]

    def log_transition(self) -> Tensor:
        """log Ā = M: ρ(Ā) = exp(max Re λ(M)), and max Re λ(M) ≤ −γ < 0 in exact arithmetic
        (the margin below ρ = 1 that rounding of exp(M) may hide)."""
        return self.generator()

    def transition(self) -> Tensor:
        return torch.linalg.matrix_exp(self.log_transition())

    def input_matrix(self) -> Tensor:
        return F.softplus(self.dt_bias)[:, None] * self.B

    def drive(self, e: Tensor) -> Tensor:
        return F.softplus(self.dt_bias) * (e @ self.B.mT)


INJECTIONS: dict[str, type[Injection]] = {
    "add": Add,
    "concat": Concat,
    "parcae": Parcae,
    "parcae-zoh": ParcaeZOH,
    "free-diagonal": FreeDiagonal,
    "stable-dense": StableDense,
}

# Injections whose construction guarantees ρ(Ā) < 1 (checked by the tests and `check`).
STABLE_BY_CONSTRUCTION = frozenset({"parcae", "parcae-zoh", "stable-dense"})


def make_injection(cfg: ModelConfig) -> Injection:
    return INJECTIONS[cfg.injection](cfg)
