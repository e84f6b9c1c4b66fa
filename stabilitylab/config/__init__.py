"""The contract layer: every configuration dataclass, its validation and the model's sizes.

Torch-free, so the store, the dashboard, the report and experiment files can use it
without loading a model.

    base.py        ConfigError, from_dict (TOML table → dataclass), the one rule for numbers
    model.py       ModelConfig and its presets
    data.py        DataConfig           ([data])
    train.py       TrainConfig, ProbeConfig, DivergenceConfig   ([train], [probes], [divergence])
    experiment.py  ExperimentConfig, SweepConfig: every table of an experiment file
    sizes.py       parameters and FLOPs in closed form (count_parameters, training_flops_per_token)
"""

from stabilitylab.config.base import (ConfigError, Interval, check_choice, check_numbers, check_positive, from_dict,
                                      number, numeric_fields, read_toml)
from stabilitylab.config.data import TOKENIZERS, DataConfig
from stabilitylab.config.experiment import SECTIONS, ExperimentConfig, SweepConfig
from stabilitylab.config.model import (DEPTH_GRANULARITIES, DEPTH_SCHEMES, INIT_STATES, INJECTIONS, PRESETS,
                                       ModelConfig)
from stabilitylab.config.sizes import (FlopCount, ParameterCount, count_parameters, inference_flops_per_token,
                                       training_flops_per_token)
from stabilitylab.config.train import DivergenceConfig, ProbeConfig, TrainConfig, resolve_depth

__all__ = ["ConfigError", "Interval", "check_choice", "check_numbers", "check_positive", "from_dict", "number",
           "numeric_fields", "read_toml", "DataConfig", "TOKENIZERS", "ExperimentConfig", "SweepConfig", "SECTIONS",
           "ModelConfig", "PRESETS", "INJECTIONS", "INIT_STATES", "DEPTH_SCHEMES", "DEPTH_GRANULARITIES",
           "FlopCount", "ParameterCount", "count_parameters", "training_flops_per_token",
           "inference_flops_per_token", "DivergenceConfig", "ProbeConfig", "TrainConfig", "resolve_depth"]
