"""Checkpoints: the model in safetensors, everything else a resume needs beside it.

    checkpoints/step_000000100.safetensors   model weights (RunWriter.checkpoint_path)
    checkpoints/step_000000100.state.pt      optimiser state, step, RNG state, the divergence
                                             monitor, running totals, ρ(Ā); read with
                                             weights_only=True (batches and depths follow
                                             from the config's seed and the step)

Each file is written under a temporary name and renamed into place, then indexed in
the run store (with its sha256), so an indexed checkpoint is always complete.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
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


def load_checkpoint(model: LoopedLM, weights: Path, state: Path, device: torch.device) -> dict[str, Any]:
    """Load the weights into `model` (strictly) and return the state dict."""
    model.load_state_dict(load_file(weights, device=str(device)))
    return torch.load(state, map_location=device, weights_only=True)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["save_checkpoint", "prune_checkpoints", "latest_checkpoint", "checkpoint_at", "load_checkpoint", "state_path"]
