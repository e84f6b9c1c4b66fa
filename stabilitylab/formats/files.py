"""Reading a checkpoint directory without running anything in it.

A checkpoint directory is untrusted input. Everything here reads data only:

    config.json                         json.loads, nothing else (no auto_map, no code)
    model.safetensors                   safetensors (a header and raw bytes: no pickle at all)
    model.safetensors.index.json        {"weight_map": {key: shard file}} + the shards it names
    pytorch_model.bin / model.pt        torch.load(weights_only=True): a pickle that names any
                                        callable other than tensor rebuilding is refused unrun

A `modeling_*.py`, `configuration_*.py` or any other file beside the weights is never
imported, and no loader passes trust_remote_code. Every problem is a CheckpointError: one
line naming the file, the key or field, and the fix.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from stabilitylab.config import ConfigError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass
class CheckpointInfo:
    """What a format's `load` read: the directory, the weight files, config.json as read, and
    the format's name (the hrm_text, huginn and ouro loaders return one beside the model)."""

    path: Path
    files: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    format: str = ""


class CheckpointError(ConfigError):
    """A checkpoint we cannot map exactly; names the file, the field or key, and the fix."""


def read_config(path: Path, layout: str = "a checkpoint directory holds config.json and its weights") -> dict[str, Any]:
    """config.json of the directory `path` as a dict (JSON only: nothing in it is executed)."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError("config.json", "missing", layout, source=path)
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError("config.json", f"is not valid JSON ({err})", "fix or re-export the file",
                              source=file) from None
    if not isinstance(raw, dict):
        raise CheckpointError("config.json", "is not a JSON object", "re-export the file", source=file)
    return raw


def peek_config(path: str | Path) -> dict[str, Any] | None:
    """config.json of `path` if it is a directory holding a readable JSON object, else None
    (a cheap test for routing a path to a format)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _check_flat(tensors: Any, file: Path) -> dict[str, Tensor]:
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in tensors.items()):
        raise CheckpointError("weights", f"holds a {type(tensors).__name__}, not a flat state dict of tensors",
                              "save model.state_dict() itself", source=file)
    return tensors


def read_weights(file: Path) -> dict[str, Tensor]:
    """A flat state dict from one file, read without running any code from it."""
    try:
        if file.suffix == ".safetensors":
            tensors = load_file(file)
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except (pickle.UnpicklingError, RuntimeError, SafetensorError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError("weights", f"cannot be read safely: {first}",
                              "a checkpoint may only hold tensors (torch.load(weights_only=True) or "
                              "safetensors); re-save it as a plain state dict", source=file) from None
    return _check_flat(tensors, file)


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """(state dict, files read) of a Hugging Face layout: model.safetensors, or the shards
    that model.safetensors.index.json names (every key from the shard the index says, and
    a shard holding a key the index does not give it is refused)."""
    index = path / SAFETENSORS_INDEX
    if (path / SAFETENSORS).is_file():
        return read_weights(path / SAFETENSORS), [SAFETENSORS]
    if not index.is_file():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pkl")):
            raise CheckpointError("weights", f"no {SAFETENSORS} or {SAFETENSORS_INDEX}; pickled weights are not "
                                  "read for this format", "convert the weights to safetensors", source=path)
        raise CheckpointError("weights", f"neither {SAFETENSORS} nor {SAFETENSORS_INDEX} found",
                              "add the weights as published (safetensors, sharded with an index)", source=path)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError("weight_map", f"unreadable ({type(err).__name__}: {err})",
                              "the index is {\"weight_map\": {key: shard file}}; re-export it", source=index) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError("weight_map", "is not a {key: shard file} object", "re-export the index", source=index)
    tensors: dict[str, Tensor] = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        file = path / shard
        if Path(shard).name != shard or file.suffix != ".safetensors":
            raise CheckpointError(f"weight_map[{next(k for k, v in weight_map.items() if v == shard)!r}]",
                                  f"names {shard!r}, not a .safetensors file in the directory",
                                  "shards lie beside the index and are safetensors", source=index)
        if not file.is_file():
            key = next(k for k, v in weight_map.items() if v == shard)
            raise CheckpointError(key, f"its shard {shard} is missing", f"download {shard} into {path}",
                                  source=index)
        part = read_weights(file)
        stray = sorted(k for k in part if weight_map.get(k) != shard)
        if stray:
            raise CheckpointError(stray[0], f"lies in {shard} but the index puts it in "
                                  f"{weight_map.get(stray[0], 'no shard')}", "re-export the index with the shards",
                                  source=file)
        tensors.update(part)
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(missing[0], f"named by the index but in no shard ({weight_map[missing[0]]})",
                              "re-download that shard", source=index)
    return tensors, [SAFETENSORS_INDEX, *shards]


def list_keys(keys: set[str] | list[str]) -> str:
    """Up to six keys, sorted, and how many more."""
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def check_keys(keys: Any, expected: Any, source: Path, hint: str, allowed: Any = ()) -> None:
    """Exactly the `expected` keys (plus those in `allowed`, checked elsewhere): a stray key or
    a missing one is a CheckpointError naming the first of them; `hint` names the config.json
    fields that decide which keys exist."""
    unknown, missing = set(keys) - set(expected) - set(allowed), set(expected) - set(keys)
    if unknown:
        raise CheckpointError(sorted(unknown)[0], f"unexpected key(s) for this config: {list_keys(unknown)}",
                              "the weights do not match config.json; stabilitylab loads nothing it cannot map",
                              source=source)
    if missing:
        raise CheckpointError(sorted(missing)[0], f"missing key(s): {list_keys(missing)}",
                              f"the weights do not match config.json ({hint}), or a shard is incomplete",
                              source=source)


__all__ = ["CheckpointInfo", "CheckpointError", "check_keys", "read_config", "peek_config", "read_weights", "read_safetensors", "list_keys",
           "SAFETENSORS", "SAFETENSORS_INDEX"]
