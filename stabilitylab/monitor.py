"""LoopMonitor: the lab's every-step instruments on any looped model, in any training loop.

    monitor = LoopMonitor(model, lab="runs", run_id="my-run")      # checks the loop interface
    for step, (x, y) in enumerate(batches, 1):
        out = model(x, y, trace=True)                               # trace: the free contraction rate
        out.loss.backward(); opt.step()
        monitor.step(step, loss=out.loss, model=model, tokens=x, state=out.state, trace=out.trace)
        opt.zero_grad()
    monitor.close()                                                 # or: with LoopMonitor(...) as monitor:

The lab's trainer records through this class too (train/trainer.py: `writer=` its own
RunWriter, `check` before the optimiser step, `scalars=` its all-reduced numbers).

The model needs the loop interface (duck-typed): encode(tokens) → e, initial_state(e,
generator), loop_map(e, tokens) → F, decode(h, tokens); its linear part from
`linear_part()` → (Ā, B̄) or None, or, for a LoopedLM, `injection.transition()` /
`input_matrix()`. A model without it is refused when the monitor is made (TypeError).

Per step (what `step` records, in the run store and every sink):
    loss, grad_norm          as given; ‖∇‖₂ of the gradients still on the parameters
    h_T_norm(_mean)          max / mean per-token ‖h_T‖ of `state` (the training forward's)
    contraction_rate         q of the training forward's own loop trace (estimate.trace_rate)
    tokens                   cumulative tokens.numel()
Every `radius_every` (8) steps:
    jacobian_radius_est      ρ(∂F/∂h) at h_T, 2 JVPs on `rows` sequences cut after `position`
                             (estimate.RadiusTracker, warm-started from the last update; a
                             LoopedLM's tangent runs through that position alone)
Every `spectrum_every` steps: the eigenvalues of Ā, ρ(Ā), ‖Ā‖₂, ‖B̄‖₂, ‖C‖₂ (log_spectrum).
Divergence and spikes: the trainer's rules (analysis.divergence) on loss, ‖∇‖ and ‖h_T‖,
logged as events; `step` returns the verdict, so a loop may stop on `.stop`.

Nothing the monitor measures may end a training run: a probe that fails (an overflowed
state, a map that will not JVP) becomes a `probe_error` event and a warning; a store that
cannot be written becomes one warning, and the monitor goes on with its sinks only.
The monitor touches no RNG that training uses (its h_0 draws use its own generator) and
never changes the model's parameters or mode.
"""

from __future__ import annotations

import math
import sqlite3
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from stabilitylab import records
from stabilitylab.analysis.estimate import (BLOCK, MEMORY, RadiusTracker, causal_prefix, last_position_map, probe_view,
                                            trace_rate)
from stabilitylab.analysis.maps import math_attention
from stabilitylab.analysis.spectra import eigenvalues, spectral_norm
from stabilitylab.config import DivergenceConfig
from stabilitylab.model import LoopedLM
from stabilitylab.store import RunWriter, StoreError
from stabilitylab.analysis.divergence import DivergenceMonitor, Verdict

INTERFACE = ("encode", "initial_state", "loop_map", "decode")
MONITOR_SALT = 0x3017  # the monitor's own h_0 stream, apart from training's
RADIUS_EVERY = 8  # steps between radius updates: one costs ~6-20% of a small step (docs/monitor.md, Cost)
Sink = Callable[[int, Mapping[str, float]], Any]


@dataclass(frozen=True)
class MonitorConfig:
    """What the monitor measures and how often (0 turns an instrument off).

    radius_every: steps between radius updates (2 JVPs each); rows, position: the sequences
    and token of the batch whose Jacobian block is tracked; block, memory: the tracker's
    JVPs per update and basis size; spectrum_every: steps between spectra of Ā; depth: loop
    iterations when the monitor must run the loop itself (no `state` given; None: the
    model's μ_rec); grad_norm: read ‖∇‖ off the parameters; divergence: the trainer's
    rules, with action "record" (the monitor never stops training by itself)."""

    radius_every: int = RADIUS_EVERY
    rows: int = 1
    position: int = -1
    block: int = BLOCK
    memory: int = MEMORY
    spectrum_every: int = 10
    depth: int | None = None
    grad_norm: bool = True
    divergence: DivergenceConfig = field(default_factory=lambda: DivergenceConfig(action="record"))

    def __post_init__(self) -> None:
        for name in ("radius_every", "spectrum_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"MonitorConfig.{name} = {getattr(self, name)}: must be ≥ 0 (0 turns it off)")
        if self.rows < 1:
            raise ValueError(f"MonitorConfig.rows = {self.rows}: must be ≥ 1")


@dataclass
class MonitorStep:
    """What one `step` recorded: the scalars, the events logged, and the reason to stop
    (a non-finite loss or gradient; None otherwise)."""

    values: dict[str, float]
    events: list[tuple[str, str]]
    stop: str | None


def check_interface(model: Any) -> Any:
    """The model itself (unwrapped from DDP / torch.compile), or TypeError naming what it lacks."""
    inner = unwrap(model)
    missing = [name for name in INTERFACE if not callable(getattr(inner, name, None))]
    if missing:
        raise TypeError(f"LoopMonitor: {type(inner).__name__} does not implement the loop interface (missing "
                        f"{', '.join(missing)}); implement encode / initial_state / loop_map / decode "
                        "(docs/monitor.md)")
    return inner


def unwrap(model: Any) -> Any:
    """The module under DistributedDataParallel (.module) and torch.compile (._orig_mod)."""
    for attr in ("_orig_mod", "module", "_orig_mod"):
        model = getattr(model, attr, model)
    return model


def linear_part(model: Any) -> tuple[Tensor, Tensor] | None:
    """(Ā, B̄) of the loop's injection: `model.linear_part()` if the model has one, else a
    LoopedLM's injection; None where the loop has no linear part."""
    method = getattr(model, "linear_part", None)
    if callable(method):
        return method()
    injection = getattr(model, "injection", None)
    if injection is None:
        return None
    return injection.transition(), injection.input_matrix()


def default_depth(model: Any) -> int | None:
    """The model's own μ_rec: `mu_rec` (the loop interface), else cfg.mean_recurrence."""
    depth = getattr(model, "mu_rec", None)
    if depth is None:
        depth = getattr(getattr(model, "cfg", None), "mean_recurrence", None)
    return None if depth is None else int(depth)


def state_norms(state: Tensor) -> tuple[Tensor, Tensor]:
    """(max, mean) over tokens of the per-token ‖h_T‖ (norm over the state channels), on the device."""
    norms = state.detach().float().norm(dim=-1)
    return norms.max(), norms.mean()


@dataclass
class Spectrum:
    """The injection's linear part at one step."""

    eigenvalues: Tensor  # complex128, every eigenvalue of Ā
    rho: float  # ρ(Ā) = max |λ|; NaN for a non-finite Ā
    norm_a: float  # ‖Ā‖₂
    norm_b: float  # ‖B̄‖₂
    norm_c: float  # ‖C‖₂ (the readout), NaN for a model without a `readout` layer


@torch.no_grad()
def injection_spectrum(model: Any) -> Spectrum | None:
    """Eigenvalues of Ā and ‖Ā‖₂ in float64 (stabilitylab.analysis.spectra: a diagonal Ā is
    its own eigenvalues); ‖B̄‖₂ and ‖C‖₂ as the largest singular values, computed on the
    device in the weights' dtype (torch.linalg.svdvals; float32 agrees with float64 to
    ~1e-6 relative) and read back in one sync. A non-finite Ā has no spectrum: NaN
    throughout; a loop without a linear part: None. The trainer's spectrum probe and the
    monitor's are this one function."""
    part = linear_part(model)
    if part is None:
        return None
    A, B = part
    readout = getattr(model, "readout", None)
    matrices = [B] + ([readout.weight] if isinstance(readout, torch.nn.Linear) else [])
    norms = torch.stack([torch.linalg.svdvals(M.detach().float())[0] for M in matrices]).tolist()
    norm_b, norm_c = norms[0], (norms[1] if len(norms) > 1 else math.nan)
    A = A.detach().cpu()
    if not torch.isfinite(A).all():
        return Spectrum(torch.empty(0, dtype=torch.complex128), math.nan, math.nan, norm_b, norm_c)
    lam = eigenvalues(A)  # sorted by modulus, descending
    return Spectrum(lam, float(lam[0].abs()), spectral_norm(A), norm_b, norm_c)


class TensorBoardSink:
    """Scalars to TensorBoard under `prefix/name`. torch.utils.tensorboard needs the optional
    `tensorboard` package; pass `writer=` (anything with add_scalar) to use your own."""

    def __init__(self, log_dir: str | Path | None = None, prefix: str = "loop", writer: Any = None):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(f"TensorBoardSink needs the tensorboard package ({err}); "
                                  "pip install tensorboard, or pass writer=") from None
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer, self.prefix = writer, prefix

    def __call__(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{self.prefix}/{name}", value, step)

    def close(self) -> None:
        close = getattr(self.writer, "close", None)
        if callable(close):
            close()


class LoopMonitor:
    """Attach to a model implementing the loop interface; call `step` after each optimiser
    step. Records to the run store at lab/run_id (None: no store) and to `sinks`."""

    def __init__(self, model: Any, lab: str | Path | None = "runs", run_id: str | None = None, *,
                 config: MonitorConfig = MonitorConfig(), sinks: Sequence[Sink] = (),
                 run_config: Mapping[str, Any] | None = None, experiment: str = "monitor", seed: int = 0,
                 probe_tokens: Tensor | None = None, writer: RunWriter | None = None):
        self.model = check_interface(model)
        self.config, self.sinks, self.seed = config, list(sinks), seed
        self.probe_tokens = probe_tokens
        self.tracker = RadiusTracker(config.block, config.memory, seed)
        self.divergence = DivergenceMonitor(config.divergence)
        self.tokens_seen = 0
        self._checked: tuple[int, Verdict] | None = None  # check()'s verdict, for step() to record
        self.writer: RunWriter | None = writer
        self.owns_writer = writer is None  # a given writer (the trainer's): its owner sets the status, closes it
        if writer is None and lab is not None:
            run_id = run_id or f"monitor-{type(self.model).__name__}"
            recorded = {**dict(run_config or {}), "monitor": _plain(asdict(config)),
                        "divergence": asdict(config.divergence)}
            model_cfg = getattr(self.model, "cfg", None)
            if model_cfg is not None and "model" not in recorded:
                recorded["model"] = _plain(asdict(model_cfg))
            try:
                self.writer = RunWriter.create(lab, run_id, recorded, experiment=experiment, seed=seed)
            except (StoreError, OSError, sqlite3.Error) as err:
                warnings.warn(f"LoopMonitor: not recording to the run store ({err}); the sinks still get every "
                              "value", RuntimeWarning, stacklevel=2)

    # ---- the step ----------------------------------------------------------------------------
    def step(self, step: int, loss: float | Tensor | None = None, model: Any = None, tokens: Tensor | None = None,
             state: Tensor | None = None, trace: Any = None, scalars: Mapping[str, float] | None = None,
             **more: float) -> MonitorStep:
        """Record step `step`: call it after optimizer.step(), before zero_grad() (for ‖∇‖).
        tokens, state, trace: the training forward's input ids, final state h_T and LoopTrace
        (each optional: without state the monitor runs the loop on `rows` sequences of
        tokens or probe_tokens itself; without trace there is no contraction rate). Other
        numbers, in `scalars` and as keywords, are recorded as they are, and win over the
        monitor's own ‖∇‖, ‖h_T‖ and token count (give the all-reduced numbers of a
        distributed run; records.TOKENS only in `scalars`, its name being the `tokens`
        argument's). Never raises because of a measurement."""
        model = self.model if model is None else check_interface(model)
        values: dict[str, float] = {name: _number(v) for name, v in {**(scalars or {}), **more}.items()}
        errors: list[str] = []
        with torch.no_grad():
            if loss is not None:
                values[records.LOSS] = _number(loss)
            if self.config.grad_norm and records.GRAD_NORM not in values:  # given: the caller's (pre-clip) norm
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if grads:
                    values[records.GRAD_NORM] = float(torch.nn.utils.get_total_norm(grads))
            if state is not None and records.STATE_NORM not in values:  # given: the caller's (all-reduced) norms
                values[records.STATE_NORM], values[records.STATE_NORM_MEAN] = map(float, state_norms(state))
            if tokens is not None and records.TOKENS not in values:
                self.tokens_seen += int(tokens.numel())
                values[records.TOKENS] = float(self.tokens_seen)
            if trace is not None:
                delta = getattr(trace, records.TRACE_DELTA_NORM_MEAN, trace)
                values[records.CONTRACTION_RATE] = trace_rate(delta)
        every = self.config.radius_every
        if every and step % every == 0 and (tokens is not None or self.probe_tokens is not None):
            try:
                values[records.RADIUS_ESTIMATE] = self._radius(model, tokens, state)
            except (ValueError, RuntimeError, TypeError) as err:
                errors.append(f"{records.RADIUS_ESTIMATE}: {err}")
        spectrum = None
        every = self.config.spectrum_every
        if every and step % every == 0:
            try:
                spectrum = self._spectrum(model)
            except (ValueError, RuntimeError) as err:
                errors.append(f"spectrum: {err}")
        verdict = self._verdict(step, values)
        events = [*verdict.events, *((records.PROBE_ERROR, e) for e in errors)]
        self._record(step, values, spectrum, events, verdict.stop)
        return MonitorStep(values, events, verdict.stop)

    def _radius(self, model: Any, tokens: Tensor | None, state: Tensor | None) -> float:
        """One tracker update on the block ∂F[p]/∂h[p] of the first `rows` sequences."""
        cfg = self.config
        with torch.no_grad():
            if tokens is None or state is None:
                source = tokens if tokens is not None else self.probe_tokens
                state, tokens = self._own_state(model, source[:cfg.rows]), source[:cfg.rows]
            tokens, h, position = causal_prefix(tokens, state.detach(), cfg.position, cfg.rows)
            if torch.finfo(h.dtype).bits < 32:  # a bfloat16 state: JVPs in float32 need float32 maps
                raise TypeError(f"the state is {h.dtype}; the radius needs a float32 state (train in float32 or "
                                "under autocast, whose loop state stays float32)")
            if isinstance(model, LoopedLM) and model.cfg.looped:  # the same block, its tangent through 1 position
                _, F = last_position_map(model, tokens)(h, image=False)  # the prefix's keys/values: fused kernel
                with math_attention():
                    return self.tracker.update(F, h[:, -1]).radius
            e = model.encode(tokens)
            F, x = probe_view(model.loop_map(e, tokens), h.to(e.dtype), position)
            return self.tracker.update(F, x).radius

    def _own_state(self, model: Any, tokens: Tensor) -> Tensor:
        """h after `depth` iterations from the model's initial state (the monitor's generator)."""
        depth = self.config.depth or default_depth(model)
        if depth is None:
            raise ValueError("no state given and the model names no depth: pass state= or MonitorConfig(depth=)")
        e = model.encode(tokens)
        generator = torch.Generator(device=e.device).manual_seed(self.seed ^ MONITOR_SALT)
        h = model.initial_state(e, generator)
        F = model.loop_map(e, tokens)
        for _ in range(depth):
            h = F(h)
        return h

    def _spectrum(self, model: Any) -> dict[str, Any] | None:
        s = injection_spectrum(model)
        if s is None:
            return None
        if math.isnan(s.rho):
            raise ValueError("Ā has non-finite entries")
        out = {"eigenvalues": s.eigenvalues.numpy(), records.RHO: s.rho, records.NORM_A: s.norm_a,
               records.NORM_B: s.norm_b}
        return out if math.isnan(s.norm_c) else {**out, records.NORM_C: s.norm_c}

    def check(self, step: int, loss: float | Tensor, grad_norm: float | None = None,
              state_norm: float | None = None) -> Verdict:
        """The divergence rules on this step's numbers, for a loop that must not apply a
        diverged update (the trainer under action "stop"): call it before optimizer.step()
        and skip the update on `.stop`; `step` then records this verdict, not a second one."""
        verdict = self.divergence.check(step, _number(loss), grad_norm, state_norm)
        self._checked = (step, verdict)
        return verdict

    def _verdict(self, step: int, values: Mapping[str, float]) -> Verdict:
        checked, self._checked = self._checked, None
        if checked is not None and checked[0] == step:
            return checked[1]
        if records.LOSS not in values:
            return Verdict()
        return self.divergence.check(step, values[records.LOSS], values.get(records.GRAD_NORM),
                                     values.get(records.STATE_NORM))  # None: that rule is skipped

    # ---- writing -------------------------------------------------------------------------------
    def _record(self, step: int, values: dict[str, float], spectrum: dict[str, Any] | None,
                events: list[tuple[str, str]], stop: str | None) -> None:
        for kind, detail in events:
            if kind == records.PROBE_ERROR:
                warnings.warn(f"LoopMonitor step {step}: {detail}", RuntimeWarning, stacklevel=3)
        if spectrum:
            values = {**values, records.RHO: spectrum[records.RHO]}
        if self.writer is not None:
            try:
                self.writer.log(step, {k: v for k, v in values.items() if k != records.RHO})
                if spectrum:
                    self.writer.log_spectrum(step, spectrum["eigenvalues"],
                                             **{k: v for k, v in spectrum.items() if k != "eigenvalues"})
                for kind, detail in events:
                    self.writer.log_event(step, kind, detail)
                if stop and self.owns_writer and self.writer.status == "running":
                    self.writer.set_status("diverged", step, stop)
            except (StoreError, OSError, sqlite3.Error, ValueError) as err:
                if not self.owns_writer:
                    raise  # the owner's store (the trainer's): its failure is the owner's to handle
                warnings.warn(f"LoopMonitor: stopped recording to the run store at step {step} ({err}); the sinks "
                              "still get every value", RuntimeWarning, stacklevel=3)
                self._drop_writer()
        for sink in self.sinks:
            try:
                sink(step, values)
            except Exception as err:  # a user's sink must not end training either
                warnings.warn(f"LoopMonitor: sink {sink!r} failed at step {step} ({err})", RuntimeWarning,
                              stacklevel=3)

    def _drop_writer(self) -> None:
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except Exception:  # already broken: nothing more to save
            pass

    def close(self, failed: BaseException | None = None) -> None:
        """End the run: 'failed' with the exception, else 'diverged' at the first recorded
        crossing of a bound, else 'finished'; close the sinks that can be closed."""
        writer = self.writer
        if writer is not None and not self.owns_writer:
            self.writer = None  # the owner ends the run and closes its writer
        elif writer is not None:
            try:
                if writer.status == "running":
                    if failed is not None:
                        writer.set_status("failed", reason=f"{type(failed).__name__}: {failed}")
                    elif self.divergence.first:
                        first_step, detail = self.divergence.first
                        writer.set_status("diverged", first_step, f"{detail} (recorded; trained on)")
                    else:
                        writer.set_status("finished")
            except (StoreError, OSError, sqlite3.Error) as err:
                warnings.warn(f"LoopMonitor: could not close the run ({err})", RuntimeWarning, stacklevel=2)
            self._drop_writer()
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                close()

    @property
    def run_dir(self) -> Path | None:
        return None if self.writer is None else self.writer.run_dir

    def __enter__(self) -> "LoopMonitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)


def _number(value: Any) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def _plain(tree: Any) -> Any:
    """A config dict with tuples as lists and non-finite floats as strings (JSON-safe)."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return str(tree)
    return tree


# ---- transformers.Trainer ------------------------------------------------------------------------

def trainer_callback(monitor: LoopMonitor) -> Any:
    """A transformers.TrainerCallback that calls monitor.step once per optimiser step, with the
    loss, ‖∇‖ and learning rate the Trainer logs for it (logging_steps = 1 logs every step;
    the Trainer clears the gradients before its step-end hook, so its own pre-clip ‖∇‖ is
    the one recorded). The Trainer calls on_step_end before on_log, so a step is recorded at
    its on_log, or at the next on_step_end (or on_train_end) if nothing was logged for it.
    The monitor measures the model it was attached to (the loop-interface view of the
    Trainer's model, sharing its parameters, e.g. HrmTextLoop(lm)), on its probe_tokens:
    the Trainer does not hand its batches to callbacks. transformers is imported only here."""
    from transformers import TrainerCallback

    logged = {records.LOSS: records.LOSS, records.GRAD_NORM: records.GRAD_NORM, "learning_rate": records.LR}

    class LoopMonitorCallback(TrainerCallback):
        def __init__(self) -> None:
            self.pending: int | None = None  # a step not yet recorded

        def _flush(self, given: Mapping[str, float] | None = None) -> None:
            if self.pending is not None:
                step, self.pending = self.pending, None
                monitor.step(step, scalars=given)

        def on_step_end(self, args, state, control, **kwargs):
            self._flush()
            self.pending = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and records.LOSS in logs and self.pending == state.global_step:
                self._flush({ours: float(logs[theirs]) for theirs, ours in logged.items() if theirs in logs})

        def on_train_end(self, args, state, control, **kwargs):
            self._flush()
            monitor.close()

    return LoopMonitorCallback()


__all__ = ["INTERFACE", "MonitorConfig", "MonitorStep", "LoopMonitor", "TensorBoardSink", "Spectrum", "check_interface",
           "linear_part", "default_depth", "state_norms", "injection_spectrum", "trainer_callback", "unwrap"]
