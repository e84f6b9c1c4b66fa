"""An experiment's configuration: every table of one experiment TOML, as dataclasses.

stabilitylab.experiment reads the file, applies `--set` overrides and expands the sweep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from stabilitylab.config.base import ConfigError, check_numbers, number
from stabilitylab.config.data import DataConfig
from stabilitylab.config.model import ModelConfig
from stabilitylab.config.train import DivergenceConfig, ProbeConfig, TrainConfig

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "probes": ProbeConfig,
            "divergence": DivergenceConfig}  # the tables of an experiment file, by name


@dataclass
class SweepConfig:
    """A grid over dotted config fields, times seeds."""

    grid: dict[str, list] = field(default_factory=dict)  # "section.field" -> values
    seeds: tuple[int, ...] = number((), "[0, inf)")  # empty: the experiment's train.seed only

    def __post_init__(self) -> None:
        self.seeds = tuple(self.seeds)
        check_numbers(self)
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"{list(self.seeds)} repeats a seed", "List each seed once")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key}", f"must be a non-empty list of values, got {values!r}",
                                  f'Write "{key}" = [value, ...]')


@dataclass
class ExperimentConfig:
    """Everything one run (or one sweep) needs; `to_dict()` is what the run store keeps."""

    name: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    probes: ProbeConfig
    divergence: DivergenceConfig
    sweep: SweepConfig

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples → lists, so a config dict equals its JSON round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value



__all__ = ["ExperimentConfig", "SweepConfig", "SECTIONS"]
