"""Spectral-bound checks: stability properties of a looped model as regression tests.

A bound is a limit one property of the loop must respect. `check_bounds` measures the
bounds asked for on a model (and, for the dynamic ones, a fixed batch) and returns a
CheckReport: a table, JSON, or JUnit XML. `stabilitylab check` and the helpers and pytest
plugin of stabilitylab.testing all run these functions, so there is one implementation.

| bound                    | holds when                                                | needs     |
|--------------------------|-----------------------------------------------------------|-----------|
| rho_margin = m           | ρ(Ā) < 1 − m, Ā rounded to settings.dtype (strict)         | weights   |
| max_input_norm = b       | ‖B̄‖₂ ≤ b                                                  | weights   |
| max_readout_norm = c     | ‖C‖₂ ≤ c                                                  | weights   |
| max_state_growth = g     | ‖h_T‖ / ‖h_μ‖ ≤ g, μ = μ_rec, T = growth_multiple · μ      | a batch   |
| max_jacobian_radius = r  | ρ(∂F/∂h) at h_D ≤ r, D = analysis_multiple · μ             | a batch   |
| max_lyapunov = λ         | λ₁ along h_0 → h_D ≤ λ                                     | a batch   |
| max_depth_loss_increase = ε | L(2μ) − L(μ) ≤ ε (nats per token, test-time depth)     | a batch   |

‖h_t‖ is the mean over the batch's tokens of the per-token state norm (LoopTrace's
state_norm_mean). The Jacobian and the Lyapunov exponent use the per-token view at
settings.position (stabilitylab.analysis.maps.at_position), as the trainer's analysis probe.
ρ(Ā) is rounded to the dtype the model runs in, because exp(−Δa) becomes exactly 1.0 for
Δa ≲ 6e-8 in float32 and ≲ 4e-3 in bfloat16; when the injection has `log_transition()`
(log Ā), the exact-arithmetic radius exp(max Re λ(log Ā)) and its margin are reported too.
A measurement that fails (a state that overflowed, a solver that did not converge) fails
its bound, with the reason.

Every bound takes any loop model (model/interface.py), not only a LoopedLM. A bound the
model cannot have is "not applicable" with the reason, and does not fail: rho_margin and
max_input_norm where linear_part() is None (no injection, as Ouro, or HRM's nested
states), max_readout_norm where the state is decoded without a linear readout C.

    bounds, settings = load_bounds("checks/bounds.toml")
    report = check_bounds(model, bounds, settings, tokens=x, targets=y, h0=h0)
    print(report.table()); report.passed; report.to_dict(); report.junit()
"""

from __future__ import annotations

import copy
import dataclasses
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from stabilitylab.analysis.lyapunov import loop_lyapunov
from stabilitylab.analysis.spectra import FLOAT_DTYPES, eigenvalues, loop_jacobian, spectral_radius
from stabilitylab.config import ConfigError, check_choice, check_numbers, from_dict, number, read_toml
from stabilitylab.model import Injection
from stabilitylab.model.interface import LinearPart, LoopModel, has_loop, linear_part_reason, run_loop

JACOBIAN_K = 4  # leading eigenvalues the Jacobian bound asks of the solver (the radius is the first)
DTYPES = ("float32", "bfloat16", "float16", "float64")
BATCH_BOUNDS = ("max_state_growth", "max_jacobian_radius", "max_lyapunov", "max_depth_loss_increase")


@dataclass
class Bounds:
    """The [bounds] table: every bound optional (None = not checked)."""

    rho_margin: float | None = number(None, "[0, 1)")  # ρ(Ā) < 1 − rho_margin, with Ā rounded to settings.dtype
    max_input_norm: float | None = number(None, "(0, inf)")  # ‖B̄‖₂ ≤ this: the injection's input matrix
    max_readout_norm: float | None = number(None, "(0, inf)")  # ‖C‖₂ ≤ this: the readout from the state
    max_state_growth: float | None = number(None, "(0, inf)")  # ‖h_T‖ / ‖h_μrec‖ ≤ this, T = growth_multiple · μ_rec
    max_jacobian_radius: float | None = number(None, "(0, inf)")  # ρ(∂F/∂h) at h_D ≤ this, D = analysis_multiple · μ_rec
    max_lyapunov: float | None = None  # largest Lyapunov exponent along h_0 → h_D ≤ this (per iteration)
    max_depth_loss_increase: float | None = None  # L(2 μ_rec) − L(μ_rec) ≤ this, nats per token

    def __post_init__(self) -> None:
        check_numbers(self)  # config/base.py: finite, inside the interval declared above

    def names(self) -> list[str]:
        """The bounds that are set, in table order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclass
class CheckSettings:
    """The [settings] table: how the bounds are measured."""

    dtype: str = "float32"  # the dtype the model runs in; Ā is rounded to it for rho_margin
    growth_multiple: int = number(4, "[2, inf)")  # max_state_growth: h_T, T = growth_multiple · μ_rec, against h_μrec
    analysis_multiple: int = number(2, "[1, inf)")  # Jacobian, Lyapunov at / along D = analysis_multiple · μ_rec
    position: int = -1  # the token whose per-token view the Jacobian and Lyapunov bounds take
    batch_size: int = number(2, "[1, inf)")  # sequences in the check batch
    seq_len: int | None = number(None, "[1, inf)")  # tokens per sequence; unset = the run's data.seq_len, or 64
    seed: int | None = number(None, "[0, inf)")  # random tokens and h_0; unset = the run's train.seed, or 0

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPES)
        check_numbers(self)


@dataclass
class BoundResult:
    """One bound, measured. quantity: what was measured, for people; strict: the bound is
    measured < allowed (else ≤); detail: the settings used and anything worth knowing (the
    exact-arithmetic radius, the solver, the reason a measurement failed)."""

    name: str
    quantity: str
    measured: float
    allowed: float
    strict: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    not_applicable: str | None = None  # why this model cannot have the bound (then it passes, unmeasured)

    @property
    def passed(self) -> bool:
        """False for a NaN measurement; +inf fails every finite bound; a bound that is not
        applicable passes (it says so everywhere it is shown)."""
        if self.not_applicable is not None:
            return True
        return self.measured < self.allowed if self.strict else self.measured <= self.allowed

    @property
    def verdict(self) -> str:
        return "n/a" if self.not_applicable is not None else "pass" if self.passed else "FAIL"

    @property
    def margin(self) -> float:
        """allowed − measured: the room left (negative: by how much the bound is broken)."""
        return self.allowed - self.measured

    @property
    def relation(self) -> str:
        return "<" if self.strict else "≤"

    def message(self) -> str:
        """One line: quantity, measured vs allowed, verdict, and the details."""
        if self.not_applicable is not None:
            return f"{self.name}: {self.quantity}: not applicable ({self.not_applicable})"
        verdict = "holds" if self.passed else "FAILS"
        notes = "; ".join(f"{k} {_fmt(v)}" for k, v in self.detail.items())
        return (f"{self.name}: {self.quantity} = {_fmt(self.measured)}, allowed {self.relation} {_fmt(self.allowed)}"
                f" (margin {_fmt(self.margin)}): {verdict}" + (f" [{notes}]" if notes else ""))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: a non-finite measured value or margin is null (the detail says why)."""
        return {"name": self.name, "quantity": self.quantity, "measured": _finite(self.measured),
                "allowed": self.allowed, "relation": self.relation, "passed": self.passed,
                "margin": _finite(self.margin), "detail": {k: _finite(v) for k, v in self.detail.items()},
                "applicable": self.not_applicable is None, "not_applicable": self.not_applicable}


@dataclass
class CheckReport:
    """Every bound of one target."""

    target: str
    results: list[BoundResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def result(self, name: str) -> BoundResult:
        return next(r for r in self.results if r.name == name)

    def table(self) -> str:
        """bound, measured, allowed, verdict, margin; details indented below a row."""
        rows = [("bound", "quantity", "measured", "allowed", "verdict", "margin")]
        rows += [(r.name, r.quantity, _fmt(r.measured), f"{r.relation} {_fmt(r.allowed)}",
                  r.verdict, _fmt(r.margin)) for r in self.results]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"check of {self.target}"]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i and self.results[i - 1].not_applicable is not None:
                lines.append(f"    not applicable: {self.results[i - 1].not_applicable}")
            elif i and self.results[i - 1].detail:
                lines.append("    " + "; ".join(f"{k} {_fmt(v)}" for k, v in self.results[i - 1].detail.items()))
        failed = [r.name for r in self.results if not r.passed]
        lines.append(f"{len(failed)} of {len(self.results)} bounds fail: {', '.join(failed)}" if failed
                     else f"all {len(self.results)} bounds hold")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "passed": self.passed, "results": [r.to_dict() for r in self.results]}

    def junit(self) -> str:
        """JUnit XML: one testsuite, one testcase per bound; a failure carries measured vs allowed."""
        failures = sum(not r.passed for r in self.results)
        suites = ET.Element("testsuites", name="stabilitylab check", tests=str(len(self.results)),
                            failures=str(failures))
        skipped = sum(r.not_applicable is not None for r in self.results)
        suite = ET.SubElement(suites, "testsuite", name=f"stabilitylab check {self.target}",
                              tests=str(len(self.results)), failures=str(failures), errors="0",
                              skipped=str(skipped))
        for r in self.results:
            case = ET.SubElement(suite, "testcase", classname=f"stabilitylab.check.{self.target}", name=r.name)
            props = ET.SubElement(case, "properties")
            for key, value in (("measured", r.measured), ("allowed", r.allowed), ("margin", r.margin)):
                ET.SubElement(props, "property", name=key, value=repr(float(value)))
            if r.not_applicable is not None:
                ET.SubElement(case, "skipped", message=f"not applicable: {r.not_applicable}")
            elif not r.passed:
                failure = ET.SubElement(case, "failure", type="BoundExceeded",
                                        message=f"{r.quantity} = {_fmt(r.measured)}, allowed {r.relation} "
                                                f"{_fmt(r.allowed)}")
                failure.text = r.message()
        ET.indent(suites)
        return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# ---- reading a bounds file ----------------------------------------------------------------

def load_bounds(path: str | Path) -> tuple[Bounds, CheckSettings]:
    """[bounds] and [settings] of a TOML file. Every mistake raises a ConfigError naming the
    file and the field: a syntax error, an unknown table, an unknown bound (listing the
    allowed ones), a wrong type or value, no bound at all."""
    path = Path(path)
    raw = read_toml(path, "bounds", "checks/bounds.toml")
    unknown = sorted(set(raw) - {"bounds", "settings"})
    if unknown:
        raise ConfigError(unknown[0], "unknown table or key", "a bounds file has a [bounds] table and an optional "
                          "[settings] table", source=path)
    table = raw.get("bounds", {})
    allowed = [f.name for f in dataclasses.fields(Bounds)]
    if isinstance(table, dict):
        for name in table:
            if name not in allowed:
                raise ConfigError(f"bounds.{name}", "unknown bound", f"allowed bounds: {', '.join(allowed)}",
                                  source=path)
    bounds = from_dict(Bounds, table, source=path, section="bounds")
    if not bounds.names():
        raise ConfigError("bounds", "sets no bound", f"set at least one of {', '.join(allowed)}", source=path)
    return bounds, from_dict(CheckSettings, raw.get("settings", {}), source=path, section="settings")


# ---- measuring one bound ------------------------------------------------------------------------

def _failed(name: str, quantity: str, allowed: float, strict: bool, err: Exception,
            detail: dict[str, Any]) -> BoundResult:
    return BoundResult(name, quantity, math.nan, allowed, strict, {**detail, "error": str(err)})


@torch.no_grad()
def exact_log_radius(injection: Injection) -> float | None:
    """log ρ(Ā) = max Re λ(log Ā), in float64 from log_transition() where the injection has one
    (None otherwise): the radius before exp() rounds it. ρ = exp(s), 1 − ρ = −expm1(s)."""
    if not hasattr(injection, "log_transition"):
        return None
    log_a = copy.deepcopy(injection).double().log_transition()
    return float(eigenvalues(log_a).real.max())


def _linear_part(source: Injection | LoopModel) -> tuple[LinearPart | None, Injection | None]:
    """(Ā, B̄) of an injection or a loop model (None where it has none), and the injection
    when there is one (for the exact-arithmetic radius of log_transition())."""
    if isinstance(source, Injection):
        return LinearPart(source.transition(), source.input_matrix()), source
    injection = getattr(source, "injection", None)
    return source.linear_part(), injection if isinstance(injection, Injection) else None


def _not_applicable(name: str, quantity: str, allowed: float, reason: str, strict: bool = False) -> BoundResult:
    return BoundResult(name, quantity, math.nan, allowed, strict, not_applicable=reason)


def rho_bound(source: Injection | LoopModel, margin: float, dtype: str = "float32") -> BoundResult:
    """ρ(Ā) < 1 − margin, with Ā rounded to `dtype` (analysis.spectra.spectral_radius), of an
    injection or a loop model's linear_part(); the detail holds the exact-arithmetic ρ and
    1 − ρ where the injection has log_transition(). Not applicable without a linear part."""
    quantity, detail = f"ρ(Ā) in {dtype}", {}
    try:
        with torch.no_grad():
            part, injection = _linear_part(source)
            if part is None:
                return _not_applicable("rho_margin", quantity, 1 - margin, linear_part_reason(source), True)
            measured = spectral_radius(part.A, dtype=FLOAT_DTYPES[dtype])
        log_rho = exact_log_radius(injection) if injection is not None else None
    except ValueError as err:
        return _failed("rho_margin", quantity, 1 - margin, True, err, detail)
    if log_rho is not None:
        detail = {"exact ρ": math.exp(log_rho), "exact 1 − ρ": -math.expm1(log_rho)}
    return BoundResult("rho_margin", quantity, measured, 1 - margin, strict=True, detail=detail)


def input_norm_bound(source: Injection | LoopModel, ceiling: float) -> BoundResult:
    """‖B̄‖₂ ≤ ceiling (largest singular value, float64); not applicable without a linear part."""
    with torch.no_grad():
        part, _ = _linear_part(source)
        if part is None:
            return _not_applicable("max_input_norm", "‖B̄‖₂", ceiling, linear_part_reason(source))
        B = part.B.detach().double()
    return BoundResult("max_input_norm", "‖B̄‖₂", float(torch.linalg.matrix_norm(B, 2)), ceiling)


def readout_norm_bound(model: LoopModel, ceiling: float) -> BoundResult:
    """‖C‖₂ ≤ ceiling (largest singular value, float64) of the readout C from the state;
    not applicable to a model that decodes its state without one."""
    readout = getattr(model, "readout", None)
    if not isinstance(readout, torch.nn.Linear):
        return _not_applicable("max_readout_norm", "‖C‖₂", ceiling,
                               "the state is decoded without a linear readout C")
    C = readout.weight.detach().double()
    return BoundResult("max_readout_norm", "‖C‖₂", float(torch.linalg.matrix_norm(C, 2)), ceiling)


@torch.no_grad()
def state_growth_bound(model: LoopModel, tokens: Tensor, h0: Tensor, ceiling: float,
                       multiple: int = 4) -> BoundResult:
    """‖h_T‖ / ‖h_μ‖ ≤ ceiling with T = multiple · μ_rec, the mean per-token state norms along
    one run of the loop map to depth T."""
    mu = model.mu_rec
    T = multiple * mu
    quantity = f"‖h_{T}‖ / ‖h_{mu}‖"
    model.eval()
    _, states = run_loop(model, tokens, T, h0)
    at_mu, at_T = (float(states[t].float().norm(dim=-1).mean()) for t in (mu, T))
    return BoundResult("max_state_growth", quantity, at_T / at_mu, ceiling,
                       detail={f"‖h_{mu}‖": at_mu, f"‖h_{T}‖": at_T})


def jacobian_bound(model: LoopModel, tokens: Tensor, h0: Tensor, ceiling: float, depth: int,
                   position: int = -1) -> BoundResult:
    """ρ(∂F/∂h) at h_depth ≤ ceiling, in the per-token view at `position`."""
    quantity, detail = f"ρ(∂F/∂h) at h_{depth}", {"position": position}
    try:
        spectrum = loop_jacobian(model, tokens, depth, position=position, h0=h0, k=JACOBIAN_K)
    except (ValueError, RuntimeError) as err:
        return _failed("max_jacobian_radius", quantity, ceiling, False, err, detail)
    return BoundResult("max_jacobian_radius", quantity, spectrum.radius, ceiling,
                       detail={**detail, "method": spectrum.method, "jvps": spectrum.jvps})


def lyapunov_bound(model: LoopModel, tokens: Tensor, h0: Tensor, ceiling: float, depth: int,
                   position: int = -1) -> BoundResult:
    """λ₁ along h_0 → h_depth ≤ ceiling (QR method, per-token view at `position`)."""
    quantity, detail = f"λ₁ over {depth} iterations", {"position": position}
    try:
        spectrum = loop_lyapunov(model, tokens, depth, k=1, position=position, h0=h0)
    except (ValueError, RuntimeError) as err:
        return _failed("max_lyapunov", quantity, ceiling, False, err, detail)
    return BoundResult("max_lyapunov", quantity, float(spectrum.exponents[0]), ceiling, detail=detail)


@torch.no_grad()
def depth_loss_bound(model: LoopModel, tokens: Tensor, targets: Tensor, h0: Tensor, ceiling: float) -> BoundResult:
    """L(2 μ_rec) − L(μ_rec) ≤ ceiling: the loss at twice the trained depth is no worse than at
    the trained depth by more than `ceiling` nats per token (same tokens, same h_0)."""
    mu = model.mu_rec
    model.eval()
    _, states = run_loop(model, tokens, 2 * mu, h0)
    at_mu, at_2mu = (_loss(model.decode(states[d], tokens), targets) for d in (mu, 2 * mu))
    return BoundResult("max_depth_loss_increase", f"L({2 * mu}) − L({mu})", at_2mu - at_mu, ceiling,
                       detail={f"L({mu})": at_mu, f"L({2 * mu})": at_2mu})


def _loss(logits: Tensor, targets: Tensor) -> float:
    """Mean next-token cross-entropy, ignore_index −100 (as LoopedLM's forward)."""
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   ignore_index=-100))


# ---- all of them ----------------------------------------------------------------------------------

@torch.no_grad()
def default_state(model: LoopModel, tokens: Tensor, seed: int = 0) -> Tensor:
    """h_0 for `tokens` from a generator seeded by `seed`: the same draw on every call."""
    return model.initial_state(model.encode(tokens), torch.Generator().manual_seed(seed))


def _require_loop(model: LoopModel) -> None:
    if not has_loop(model):
        raise ConfigError("target", "is a GPT baseline (looped = false): it has no loop to check",
                          "check a looped model")


def check_bounds(model: LoopModel, bounds: Bounds, settings: CheckSettings | None = None,
                 tokens: Tensor | None = None, targets: Tensor | None = None, h0: Tensor | None = None,
                 label: str = "model") -> CheckReport:
    """Measure every bound set in `bounds` on a loop model. The dynamic bounds need `tokens`
    (B, T); max_depth_loss_increase also `targets`; h0 defaults to default_state(model, tokens)."""
    settings = settings or CheckSettings()
    _require_loop(model)
    mu = model.mu_rec
    need_batch = [n for n in bounds.names() if n in BATCH_BOUNDS]
    if need_batch and tokens is None:
        raise ValueError(f"bounds {', '.join(need_batch)} are measured on a batch: pass tokens=")
    if bounds.max_depth_loss_increase is not None and targets is None:
        raise ValueError("max_depth_loss_increase compares losses: pass targets= (the next tokens)")
    if tokens is not None:
        T = tokens.shape[-1]
        if not -T <= settings.position < T:
            raise ConfigError("settings.position", f"{settings.position} is outside a sequence of {T} tokens",
                              f"use a position in {-T}..{T - 1} (−1: the last token)")
        h0 = default_state(model, tokens) if h0 is None else h0
    depth = settings.analysis_multiple * mu
    measure: dict[str, Callable[[float], BoundResult]] = {
        "rho_margin": lambda m: rho_bound(model, m, settings.dtype),
        "max_input_norm": lambda b: input_norm_bound(model, b),
        "max_readout_norm": lambda c: readout_norm_bound(model, c),
        "max_state_growth": lambda g: state_growth_bound(model, tokens, h0, g, settings.growth_multiple),
        "max_jacobian_radius": lambda r: jacobian_bound(model, tokens, h0, r, depth, settings.position),
        "max_lyapunov": lambda lam: lyapunov_bound(model, tokens, h0, lam, depth, settings.position),
        "max_depth_loss_increase": lambda eps: depth_loss_bound(model, tokens, targets, h0, eps),
    }
    return CheckReport(label, [measure[name](getattr(bounds, name)) for name in bounds.names()])


__all__ = ["Bounds", "CheckSettings", "BoundResult", "CheckReport", "load_bounds", "check_bounds", "rho_bound",
           "input_norm_bound", "readout_norm_bound", "state_growth_bound", "jacobian_bound", "lyapunov_bound",
           "depth_loss_bound", "exact_log_radius", "default_state", "BATCH_BOUNDS", "DTYPES"]
