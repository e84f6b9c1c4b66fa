"""Outside checkpoint formats → models that implement the loop interface (model/interface.py).

One module per format; this registry picks one from the directory's config.json:

| format      | detected by                                       | module                 |
|-------------|---------------------------------------------------|------------------------|
| parcae_lm   | "_class_name" ParcaeConfig / GPTConfig (layout)   | formats/parcae_lm.py   |
| hrm_text    | "model_type": "hrm_text"                          | formats/hrm_text.py    |
| huginn      | "model_type": "huginn_raven"                      | formats/huginn.py      |
| ouro        | "model_type": "ouro"                              | formats/ouro.py        |

    model, info = load("parcae-140m/")                        # detected from config.json
    model, info = load("hrm/", format="hrm_text", dtype=torch.bfloat16)
    detect("hrm/")                                            # -> "hrm_text"

A format's module is imported only when a directory of that format is loaded (hrm_text
imports transformers). Nothing in a checkpoint directory ever runs: files.py reads JSON and
tensors only. Arrows: formats → model, never back.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stabilitylab.formats.files import CheckpointError, peek_config
from stabilitylab.formats.parcae_lm import is_parcae_config


@dataclass(frozen=True)
class Format:
    """A registered format: its module (which defines `load(path, device, dtype) -> (model,
    info)`) and the config.json model_type values that select it."""

    name: str
    module: str
    model_types: tuple[str, ...] = ()


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("parcae_lm", "stabilitylab.formats.parcae_lm"),
    Format("hrm_text", "stabilitylab.formats.hrm_text", ("hrm_text",)),
    Format("huginn", "stabilitylab.formats.huginn", ("huginn_raven",)),
    Format("ouro", "stabilitylab.formats.ouro", ("ouro",)),
)}
MODEL_TYPES = {t: f.name for f in FORMATS.values() for t in f.model_types}


def detect(path: str | Path) -> str | None:
    """The format of a checkpoint directory from its config.json (model_type, else the
    parcae_lm layout), or None when it has no readable config.json or names no known format."""
    raw = peek_config(path)
    if raw is None:
        return None
    if raw.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[raw["model_type"]]
    return "parcae_lm" if is_parcae_config(raw) else None


def is_checkpoint_dir(path: str | Path) -> bool:
    """True when `path` is a directory with a config.json naming a model_type or a parcae_lm
    config: a directory `load` should be asked about (its errors then say what is wrong)."""
    raw = peek_config(path)
    return raw is not None and ("model_type" in raw or is_parcae_config(raw))


def load(path: str | Path, format: str | None = None, dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, what was read) from a checkpoint directory in any registered
    format; `format` forces one (else detect()). dtype None keeps the weights' float32."""
    path = Path(path)
    if format is None:
        format = detect(path)
        if format is None:
            raw = peek_config(path)
            if raw is None:
                raise CheckpointError("config.json", "missing or unreadable", "pass a checkpoint directory "
                                      "(config.json + weights)", source=path)
            kind = raw.get("model_type")
            raise CheckpointError("model_type", f"{kind!r} is not a format stabilitylab reads" if kind else
                                  "absent, and the layout is not parcae_lm's",
                                  f"known model_type values: {', '.join(sorted(MODEL_TYPES))}; or force one "
                                  f"with format= (--format): {', '.join(FORMATS)}", source=path / "config.json")
    if format not in FORMATS:
        raise CheckpointError("format", f"{format!r} is unknown", f"choose one of {', '.join(FORMATS)}")
    module = importlib.import_module(FORMATS[format].module)
    return module.load(path, device=device, dtype=dtype)


__all__ = ["Format", "FORMATS", "MODEL_TYPES", "CheckpointError", "detect", "is_checkpoint_dir", "load"]
