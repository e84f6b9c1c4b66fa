"""Experiments: one TOML file → an ExperimentConfig, `--set` overrides, sweep cells.

    name = "quick"                       # optional; default: the file's stem
    [model]                              # ModelConfig; `preset = "tiny"` starts from a preset
    [data]                               # DataConfig (stabilitylab.data)
    [train]                              # TrainConfig   (stabilitylab.train.config)
    [probes]                             # ProbeConfig
    [divergence]                         # DivergenceConfig
    [sweep]
    seeds = [0, 1]                       # each cell once per seed (sets train.seed)
    [sweep.grid]
    "model.injection" = ["concat", "parcae"]   # any dotted field, a list of values
    "train.lr" = [3e-3, 1e-2]

A sweep is the product of its grid's lists (in file order) times its seeds. A cell's
id names its values, "injection=concat,lr=0.01,seed=0" (the last part of each key,
the full key where two would clash), and is its run's name inside the experiment's
group: runs/quick/injection=concat,lr=0.01,seed=0. Ids depend only on the values, so
a rerun of the sweep finds its runs again.

Every mistake raises a ConfigError naming the file, the section.field and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stabilitylab import records
from stabilitylab.config import (SECTIONS, ConfigError, ExperimentConfig, ModelConfig, SweepConfig, from_dict,
                                 read_toml, resolve_depth, training_flops_per_token)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")  # what a cell id may not contain (it names a directory)


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its id (a run name), the values it sets and its config."""

    id: str
    values: dict[str, Any]
    config: ExperimentConfig


# ---- reading -------------------------------------------------------------------------------

def read_experiment(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The raw tables of an experiment file with `--set key=value` overrides applied."""
    path = Path(path)
    raw = read_toml(path, "experiment", "experiments/quick.toml")
    raw.setdefault("name", path.stem)
    for item in sets:
        key, value = parse_set(item)
        _assign(raw, key, value, "--set")
    return raw


def parse_set(item: str) -> tuple[str, Any]:
    """"train.lr=1e-2" → ("train.lr", 0.01): the value is read as a TOML value (number,
    bool, string, list), and as a plain string when it is not one (model.injection=concat)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("--set", f"{item!r} is not key=value", "Write e.g. --set train.lr=1e-2")
    try:
        return key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return key, text


def _assign(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set the dotted field `key` of the raw tables, checking that the field exists."""
    parts = key.split(".")
    if parts == ["name"]:
        raw["name"] = value
        return
    section, rest = parts[0], parts[1:]
    if section not in SECTIONS or len(rest) != 1:
        raise ConfigError(key, "is not a config field", "Use section.field with a section among "
                          f"{', '.join(SECTIONS)} (e.g. train.lr), or name", source=source)
    known = {f.name for f in dataclasses.fields(SECTIONS[section])} | ({"preset"} if section == "model" else set())
    if rest[0] not in known:
        raise ConfigError(key, "unknown field", f"Known fields of [{section}]: {', '.join(sorted(known))}",
                          source=source)
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(section, "must be a table", f"Write [{section}] with fields under it", source=source)
    table[rest[0]] = value


# ---- building -------------------------------------------------------------------------------

def build_experiment(raw: dict[str, Any], source: str | Path | None = None,
                     sets: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """An ExperimentConfig from raw tables; every error names the file and section.field, or
    `--set` when the field's value came from one of `sets` (read_experiment applied them)."""
    try:
        return _build(raw, source)
    except ConfigError as err:
        if err.field in {parse_set(item)[0] for item in sets}:
            raise ConfigError(err.field, err.problem, err.fix, source="--set") from None
        raise


def _build(raw: dict[str, Any], source: str | Path | None) -> ExperimentConfig:
    unknown = set(raw) - {"name", "sweep", *SECTIONS}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(key, "unknown section", f"Allowed: name, {', '.join(SECTIONS)}, sweep", source=source)
    name = raw.get("name", "")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError("name", f"{name!r} cannot name a run directory",
                          "Use letters, digits, '.', '_' and '-', starting with a letter or digit", source=source)
    tables = {}
    for section, cls in SECTIONS.items():
        table = raw.get(section, {})
        if section == "model" and isinstance(table, dict) and "preset" in table:
            fields = {k: v for k, v in table.items() if k != "preset"}
            try:
                table = {**ModelConfig.preset(table["preset"]).to_dict(), **fields}
            except ConfigError as err:
                raise err.located(source, "model") from None
        tables[section] = from_dict(cls, table, source=source, section=section)
    sweep = _sweep(raw.get("sweep", {}), source)
    exp = ExperimentConfig(name=name, sweep=sweep, **tables)
    _apply_flop_budget(exp, source)
    _check_together(exp, source)
    return exp


def _apply_flop_budget(exp: ExperimentConfig, source: str | Path | None) -> None:
    """train.flop_budget > 0 sets train.steps = round(budget / FLOPs of one step), the FLOPs
    of a step being training_flops_per_token (config/sizes.py, the nominal split
    n = μ_rec − μ_bwd, k = μ_bwd) × batch_size × seq_len. So one grid over budgets × μ_rec
    is an isoFLOP sweep; the run logs the FLOPs it actually spent (sampled depths)."""
    tc = exp.train
    if not tc.flop_budget:
        return
    per_step = training_flops_per_token(exp.model, exp.data.seq_len).total * tc.batch_size * exp.data.seq_len
    steps = round(tc.flop_budget / per_step)
    if steps <= tc.warmup_steps:
        raise ConfigError("train.flop_budget", f"{tc.flop_budget:g} FLOPs buy {steps} steps of {per_step:.4g} "
                          f"FLOPs, not more than warmup_steps = {tc.warmup_steps}",
                          "Raise the budget or lower train.warmup_steps", source=source)
    tc.steps = steps


def _sweep(table: Any, source: str | Path | None) -> SweepConfig:
    if isinstance(table, dict) and isinstance(table.get("grid"), dict):
        table = {**table, "grid": records.dotted(table["grid"])}  # unquoted dotted TOML keys
        for key in table["grid"]:
            _assign({}, key, None, str(source or "sweep"))  # the field must exist
    return from_dict(SweepConfig, table, source=source, section="sweep")




def _check_together(exp: ExperimentConfig, source: str | Path | None) -> None:
    """Rules that span sections."""
    if exp.data.seq_len > exp.model.block_size:
        raise ConfigError("data.seq_len", f"{exp.data.seq_len} exceeds model.block_size = {exp.model.block_size}",
                          "Lower data.seq_len or raise model.block_size", source=source)
    try:
        resolve_depth(exp.probes.trace_depth, exp.model.mean_recurrence)
    except ConfigError as err:
        raise err.located(source, "probes") from None


def load_experiment(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, override and build an experiment file (its [sweep] stays a description)."""
    return build_experiment(read_experiment(path, sets), path, sets)


# ---- sweeps ---------------------------------------------------------------------------------

def sweep_cells(raw: dict[str, Any], source: str | Path | None = None,
                sets: list[str] | tuple[str, ...] = ()) -> list[Cell]:
    """The cells of an experiment's sweep: grid product (file order) times seeds, each a
    complete config without a sweep. No sweep: one cell with the empty id. `sets`: the
    `--set` overrides read_experiment applied (errors in their fields blame `--set`)."""
    sweep = build_experiment(raw, source, sets).sweep
    keys = list(sweep.grid)
    short = {k: k.split(".")[-1] for k in keys}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1 or s == "seed"}
    labels = {k: k if short[k] in clashes else short[k] for k in keys}
    cells, seen = [], {}
    for seed in sweep.seeds or (None,):
        for combo in itertools.product(*(sweep.grid[k] for k in keys)):
            values = dict(zip(keys, combo))
            parts = [f"{labels[k]}={_format(v)}" for k, v in values.items()]
            cell_raw = copy.deepcopy(raw)
            cell_raw["sweep"] = {}
            for key, value in values.items():
                _assign(cell_raw, key, value, str(source or "sweep"))
            if seed is not None:
                values["train.seed"] = seed
                parts.append(f"seed={seed}")
                _assign(cell_raw, "train.seed", seed, str(source or "sweep"))
            cell_id = _UNSAFE.sub("_", ",".join(parts))
            if cell_id in seen:
                raise ConfigError("sweep.grid", f"cells {seen[cell_id]} and {values} share the id {cell_id!r}",
                                  "Give every grid value a distinct printed form", source=source)
            seen[cell_id] = values
            cells.append(Cell(cell_id, values, build_experiment(cell_raw, source, sets)))
    return cells


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ";".join(map(_format, value)) + "]"
    return repr(value) if isinstance(value, float) else str(value)


__all__ = ["ExperimentConfig", "SweepConfig", "Cell", "SECTIONS", "read_experiment", "parse_set",
           "build_experiment", "load_experiment", "sweep_cells"]
