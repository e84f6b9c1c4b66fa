"""Targets: the model that `analyze` and `check` look at, and the batch they look with.

A target is one of

    a run                  a run directory, or a run id inside a lab: the model of the run's
                           config with the weights of its newest checkpoint (or of `step`),
                           checked against the sha256 in the run's checkpoint index
    a checkpoint file      a run's checkpoints/step_N.safetensors (the config and the step
                           come from the run it lies in), or a safetensors file with its
                           run's config.json beside it
    a format directory     config.json + weights in an outside format: parcae_lm, hrm_text, huginn,
                           ouro (stabilitylab.formats.load; detected from config.json, or forced
                           with format=)

    target = load_target("runs/quick/injection=parcae")          # newest checkpoint
    target = load_target("quick/injection=parcae", lab="runs", step=100)
    target.model, target.kind, target.step, target.run, target.label
    batch = target.batch(batch_size=2)                            # Batch(tokens, targets, h0)

The batch. A target with a run config uses that run's corpus: the first `batch_size`
validation windows (Corpus.val_batches(1, batch_size, data.seq_len)) and the initial state
of the trainer's probe batch (a generator seeded by train.seed ^ PROBE_SALT), so that
`analyze` at a checkpoint step measures what the trainer's analysis probe measured there.
Any other target gets `tokens` the caller passes (a (B, T + 1) integer array: inputs are
the first T columns, next-token targets the last T), or uniform random tokens from a
generator seeded by `seed`, with h_0 from a generator seeded by seed ^ PROBE_SALT.

Anything unreadable raises a TargetError (a ConfigError) naming the path, the problem and
the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from stabilitylab import records
from stabilitylab.analysis.bounds import BATCH_BOUNDS, Bounds, CheckReport, CheckSettings, check_bounds
from stabilitylab.config import ConfigError
from stabilitylab.data import prepare
from stabilitylab.experiment import ExperimentConfig, build_experiment
from stabilitylab.formats import FORMATS, detect, is_checkpoint_dir
from stabilitylab.formats import load as load_format
from stabilitylab.model import LoopedLM, LoopModel
from stabilitylab.store import DB_NAME, DEFAULT_LAB, Run, StoreError, open_run
from stabilitylab.train.checkpoint import checkpoint_at

KINDS = ("run", "checkpoint", *FORMATS)  # a format directory's kind is its format's name
DEFAULT_SEQ_LEN = 64  # random-token batches: tokens per sequence (capped at the model's block_size)


class TargetError(ConfigError):
    """A target that cannot be loaded; the message names the path, the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str = ""):
        super().__init__("target", problem, fix, source=path)


@dataclass
class Batch:
    """tokens (B, T) int64, targets (B, T) int64 (the next tokens), h0 (B, T, state_dim)."""

    tokens: Tensor
    targets: Tensor
    h0: Tensor


@dataclass
class Target:
    """A loaded target. model: a loop model (model/interface.py), eval mode, float32, CPU;
    kind: one of KINDS; path: the run directory, checkpoint file or format directory; step:
    the checkpoint's training step (None for a format directory or a loose checkpoint file);
    run: the run to record analysis into (None outside a run); experiment: the run's config
    (None for a format directory)."""

    model: LoopModel
    kind: str
    path: Path
    step: int | None = None
    run: Run | None = None
    experiment: ExperimentConfig | None = None

    @property
    def label(self) -> str:
        name = self.run.id if self.run is not None else str(self.path)
        return name if self.step is None else f"{name} (step {self.step})"

    def batch(self, batch_size: int, seq_len: int | None = None, seed: int | None = None,
              tokens: np.ndarray | None = None) -> Batch:
        """The fixed batch of the module docstring. seq_len: None = the run's data.seq_len (a
        shorter one truncates its windows) or DEFAULT_SEQ_LEN; seed: None = the run's
        train.seed, or 0. `tokens` replace the corpus or random tokens."""
        model = self.model
        if batch_size < 1 or (seq_len is not None and seq_len < 1):
            raise ConfigError("batch", f"batch_size {batch_size} × seq_len {seq_len} is empty", "pass sizes ≥ 1")
        if seed is None:
            seed = self.experiment.train.seed if self.experiment is not None else 0
        if tokens is not None:
            x, y = _split_tokens(tokens, model.vocab_size)
        elif self.experiment is not None:
            x, y = _corpus_windows(self.experiment, batch_size, seq_len)
        else:
            length = min(DEFAULT_SEQ_LEN, model.block_size) if seq_len is None else seq_len
            generator = torch.Generator().manual_seed(seed)
            chunk = torch.randint(0, model.vocab_size, (batch_size, length + 1), generator=generator)
            x, y = chunk[:, :-1], chunk[:, 1:]
        if x.shape[1] > model.block_size:
            raise ConfigError("seq_len", f"{x.shape[1]} tokens exceed the model's block_size {model.block_size}",
                              "pass shorter sequences")
        generator = torch.Generator().manual_seed(seed ^ records.PROBE_SALT)
        with torch.no_grad():
            h0 = model.initial_state(model.encode(x), generator)
        return Batch(x.contiguous(), y.contiguous(), h0)


def load_target(ref: str | Path, lab: str | Path = DEFAULT_LAB, step: int | None = None,
                format: str | None = None, prefix_len: int = 0) -> Target:
    """A Target from a run directory or run id in `lab`, a checkpoint file, or a format
    directory (tried in this order: format directory, run, file). `step` picks a run's
    checkpoint (default: the newest); it is refused for the other kinds. `format` forces
    the format of a directory (else it is detected from its config.json). `prefix_len` p
    marks positions 0..p−1 of every sequence as the instruction of a prefix-LM (HRM-Text:
    attention within them is bidirectional); refused for a model without that mask."""
    path = Path(ref)
    if format is not None or is_checkpoint_dir(path):
        kind = format or detect(path) or "format"
        _no_step(step, path, f"a {kind} directory holds one checkpoint")
        model, _ = load_format(path, format)  # an unknown format is refused here, naming model_type
        if prefix_len:
            if not hasattr(model, "prefix_len"):
                raise TargetError(path, f"prefix_len {prefix_len}: a {kind} model has no prefix-LM mask (only "
                                        "hrm_text has one)", "Drop --prefix-len")
            if not getattr(model.lm.config, "prefix_lm", True):
                raise TargetError(path / "config.json", f"prefix_len {prefix_len}: prefix_lm is false, the model "
                                                        "attends causally only", "Drop --prefix-len")
            model.prefix_len = prefix_len
        return Target(model.eval(), kind, path)
    if prefix_len:
        raise TargetError(path, f"prefix_len {prefix_len}: only a checkpoint directory of a prefix-LM format "
                                "(hrm_text) has a prefix-LM mask", "Drop --prefix-len")
    if (path / DB_NAME).is_file() or (Path(lab) / path / DB_NAME).is_file():
        return _from_run(open_run(ref, lab), step, "run")
    if path.is_file():
        _no_step(step, path, "a checkpoint file holds one step")
        return _from_file(path)
    raise TargetError(path, f"is not a run directory, a run id in lab {lab}, a checkpoint file or a "
                      f"checkpoint directory of a known format ({', '.join(FORMATS)})",
                      "pass one of these (`stabilitylab runs LAB` lists run ids)")

def checkpoint_steps(run: Run) -> list[int]:
    """The steps of a run's indexed checkpoints, ascending."""
    return sorted({int(s) for s in run.checkpoints()["step"]})


def _no_step(step: int | None, path: Path, why: str) -> None:
    if step is not None:
        raise TargetError(path, f"--checkpoint {step} picks a run's checkpoint, but {why}",
                          "pass the run instead, or drop --checkpoint")


def _from_run(run: Run, step: int | None, kind: str) -> Target:
    steps = checkpoint_steps(run)
    if not steps:
        raise StoreError(run.path, "has no checkpoint", "train it first (checkpoints are written every "
                         "train.checkpoint_every steps and at the end); a compacted run has none")
    step, weights, _ = checkpoint_at(run, steps[-1] if step is None else step)
    exp = _experiment(run.meta()["config"], run.path / "config.json")
    return Target(_model(exp, weights), kind, run.path, step, run, exp)


def _from_file(path: Path) -> Target:
    if is_checkpoint_dir(path.parent):
        raise TargetError(path, "is a weights file of a format checkpoint directory",
                          f"pass its directory, {path.parent}")
    run_dir = path.resolve().parent.parent
    if (run_dir / DB_NAME).is_file():
        run = Run(run_dir)
        table = run.checkpoints()
        rows = table[table["path"] == str(run.path / path.resolve().relative_to(run_dir))]
        if rows.empty:
            raise TargetError(path, f"lies in run {run_dir} but is not in its checkpoint index (a pruned step "
                              "or an interrupted write)", f"pass the run and one of its steps: {checkpoint_steps(run)}")
        return _from_run(run, int(rows["step"].iloc[0]), "checkpoint")
    config = path.parent / "config.json"
    if not config.is_file():
        raise TargetError(path, "a checkpoint file outside a run has no model config",
                          "keep it in its run's checkpoints/ folder, or put the run's config.json beside it")
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise TargetError(config, f"unreadable ({err})", "restore the run's config.json") from None
    exp = _experiment(raw, config)
    return Target(_model(exp, path), "checkpoint", path, experiment=exp)


def _experiment(raw: object, source: Path) -> ExperimentConfig:
    if not isinstance(raw, dict) or "model" not in raw:
        raise TargetError(source, "is not a run's config (no [model] table)",
                          "use the config.json a stabilitylab run wrote")
    return build_experiment(raw, source)


def _model(exp: ExperimentConfig, weights: Path) -> LoopedLM:
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise TargetError(weights, f"cannot read it as safetensors weights ({err})",
                          "pass a checkpoints/step_N.safetensors file written by the trainer") from None
    try:
        return LoopedLM.from_state_dict(exp.model, state).eval()
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise TargetError(weights, f"the weights do not fit the run's [model] config ({detail})",
                          "pair the file with the config of the run that wrote it") from None


def _corpus_windows(exp: ExperimentConfig, batch_size: int, seq_len: int | None) -> tuple[Tensor, Tensor]:
    full = exp.data.seq_len
    if seq_len is not None and not 1 <= seq_len <= full:
        raise ConfigError("seq_len", f"{seq_len} is outside 1..{full}, the run's data.seq_len",
                          "pass a shorter seq_len, or none for the run's own")
    x, y = prepare(exp.data).val_batches(1, batch_size, full)[0]
    return x[:, :seq_len or full], y[:, :seq_len or full]


def _split_tokens(tokens: np.ndarray, vocab_size: int) -> tuple[Tensor, Tensor]:
    array = np.asarray(tokens)
    if array.ndim != 2 or array.shape[1] < 2 or not np.issubdtype(array.dtype, np.integer):
        raise ConfigError("tokens", f"need a (batch, seq_len + 1) integer array, got {array.dtype} of shape "
                          f"{array.shape}", "inputs are its first seq_len columns, targets its last seq_len")
    if array.size and not (0 <= array.min() and array.max() < vocab_size):
        raise ConfigError("tokens", f"ids span {array.min()}..{array.max()}, outside the model's vocabulary "
                          f"0..{vocab_size - 1}", "tokenize with the model's tokenizer")
    chunk = torch.from_numpy(array.astype(np.int64))
    return chunk[:, :-1], chunk[:, 1:]


def check_target(ref: str | Path, bounds: Bounds, settings: CheckSettings, tokens: np.ndarray | None = None,
                 lab: str | Path = DEFAULT_LAB, step: int | None = None, format: str | None = None,
                 prefix_len: int = 0) -> CheckReport:
    """analysis.bounds.check_bounds on a target with its batch (what `stabilitylab check` runs);
    `tokens` replace the target's own batch (see Target.batch)."""
    target = load_target(ref, lab, step, format, prefix_len)
    if not any(name in BATCH_BOUNDS for name in bounds.names()):
        return check_bounds(target.model, bounds, settings, label=target.label)
    batch = target.batch(settings.batch_size, settings.seq_len, settings.seed, tokens)
    return check_bounds(target.model, bounds, settings, batch.tokens, batch.targets, batch.h0, label=target.label)


def read_tokens(path: str | Path) -> np.ndarray:
    """A token batch from a .npy file (read without pickle)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise TargetError(path, f"cannot read a token array from it ({err})",
                          "save a (batch, seq_len + 1) integer array with numpy.save") from None


__all__ = ["KINDS", "DEFAULT_SEQ_LEN", "TargetError", "Batch", "Target", "load_target", "checkpoint_steps",
           "check_target", "read_tokens"]
