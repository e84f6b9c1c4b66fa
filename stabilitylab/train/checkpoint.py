"""Checkpoints: the model in safetensors, everything else a resume needs beside it.

    checkpoints/step_000000100.safetensors   model weights (RunWriter.checkpoint_path)
    checkpoints/step_000000100.state.pt      optimiser state, step, RNG state, the divergence
                                             monitor, running totals, ρ(Ā); read with
                                             weights_only=True (batches and depths follow
                                             from the config's seed and the step)

Each file is written under a temporary name and renamed into place, then indexed in
the run store (with its sha256), so an indexed checkpoint is always complete. Both files get
one mode, what a new file gets under the umask (0644 under the usual 022): safetensors
writes 0600 on its own, torch.save follows the umask.

A resume starts from `resume_checkpoint`: a chosen step's checkpoint, or the newest whose
files still match their sha256 (a damaged newer one is skipped, and said so in one line).
Every refusal of a checkpoint (missing, damaged, unreadable, a state that is not ours) is a
StoreError: one line naming the file, the problem and the fix, never a traceback.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stabilitylab.model import LoopedLM
from stabilitylab.store import Run, RunWriter, StoreError


def state_path(weights: Path) -> Path:
    """The state file beside a weights file: step_N.safetensors → step_N.state.pt."""
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".state.pt")


def save_checkpoint(writer: RunWriter, step: int, model: LoopedLM | dict[str, Tensor], state: dict[str, Any]) -> None:
    """Write and index the checkpoint of `step`: model weights (a model, or its full
    state dict, distributed.full_state) and `state`."""
    weights = writer.checkpoint_path(step)
    full = model if isinstance(model, dict) else model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in full.items()}
    _atomic(weights, lambda tmp: save_file(tensors, tmp))
    _atomic(state_path(weights), lambda tmp: torch.save(state, tmp))
    writer.add_checkpoint(step, weights)
    writer.add_checkpoint(step, state_path(weights))


def prune_checkpoints(writer: RunWriter, run: Run, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (keep = 0: keep all)."""
    steps = sorted(set(run.checkpoints()["step"]))
    for step in steps[:-keep] if keep else []:
        writer.remove_checkpoint(int(step))


STATE_KEYS = ("step", "optimizers", "rng", "monitor", "totals", "rho")  # what save_checkpoint's caller stores


def latest_checkpoint(run: Run) -> tuple[int, Path, Path] | None:
    """(step, weights, state) of the newest complete checkpoint, its files checked against
    their sha256 in the index; None when the run has none."""
    steps = run.checkpoints()["step"]
    return None if steps.empty else checkpoint_at(run, int(steps.max()))


def checkpoint_at(run: Run, step: int) -> tuple[int, Path, Path]:
    """(step, weights, state) of the checkpoint of `step`, its files checked against their
    sha256 in the index; a step the index lacks is refused, naming the steps it has."""
    table = run.checkpoints()
    rows = table[table["step"] == step]
    if rows.empty:
        have = ", ".join(map(str, sorted(set(table["step"])))) or "none"
        raise StoreError(run.path, f"has no checkpoint of step {step} (indexed steps: {have})",
                         "pick one of the indexed steps")
    for path, digest in zip(rows["path"], rows["sha256"]):
        if not Path(path).is_file() or _sha256(path) != digest:
            raise StoreError(path, f"checkpoint of step {step} is missing or damaged (sha256 differs from the index)",
                             "restore the file, or train a new run")
    weights = Path(rows["path"][rows["path"].str.endswith(".safetensors")].iloc[0])
    return step, weights, state_path(weights)


def resume_checkpoint(run: Run, step: int | None = None,
                      report: Callable[[str], None] | None = None) -> tuple[int, Path, Path] | None:
    """The checkpoint a resume starts from: that of `step` (refused if missing or damaged), or
    by default the newest whose files pass their sha256. Newer damaged ones are skipped and
    `report`ed in one line; if every checkpoint is damaged the resume is refused. None when
    the run has no checkpoint (the resume starts from step 0)."""
    if step is not None:
        return checkpoint_at(run, step)
    steps = sorted(set(run.checkpoints()["step"]), reverse=True)
    damaged = []
    for candidate in steps:
        try:
            found = checkpoint_at(run, int(candidate))
        except StoreError:
            damaged.append(int(candidate))
            continue
        if damaged and report:
            report(f"{run.path}: resuming from step {found[0]}, the newest intact checkpoint (step "
                   f"{', '.join(map(str, damaged))}: missing or damaged, sha256 differs from the index)")
        return found
    if damaged:
        raise StoreError(run.path, f"every checkpoint is missing or damaged (steps {', '.join(map(str, damaged))})",
                         "restore one from a backup, or train a new run")
    return None


def load_checkpoint(model: LoopedLM, weights: Path, state: Path, device: torch.device) -> dict[str, Any]:
    """Load the weights into `model` (strictly) and return the state dict. A file that cannot
    be read, holds other tensors or would need code to unpickle is a one-line StoreError."""
    try:
        model.load_state_dict(load_file(weights, device=str(device)))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise StoreError(weights, f"cannot load these weights into the run's model ({_first_line(err)})",
                         "resume from another checkpoint (--checkpoint STEP), or train a new run") from None
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning is not for the user: it is refused
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(state, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise StoreError(state, f"refused: not a training state that loads without running code "
                         f"({type(err).__name__}: {_first_line(err)})",
                         "resume from another checkpoint (--checkpoint STEP), or train a new run") from None
    missing = [k for k in STATE_KEYS if not isinstance(loaded, dict) or k not in loaded]
    if missing:
        raise StoreError(state, f"is not a training state of this lab (no {', '.join(missing)})",
                         "resume from another checkpoint (--checkpoint STEP), or train a new run")
    return loaded


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


def file_mode() -> int:
    """The mode a new file gets here: 0o666 less the umask (0644 under the usual 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["save_checkpoint", "prune_checkpoints", "latest_checkpoint", "checkpoint_at", "resume_checkpoint",
           "load_checkpoint", "state_path", "file_mode", "STATE_KEYS"]
