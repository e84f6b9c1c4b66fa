"""Deprecated: TrainConfig, ProbeConfig and DivergenceConfig now live in `stabilitylab.config`
(the torch-free contract layer). This module re-exports them for one release."""

import warnings

from stabilitylab.config.train import (DEVICES, DIVERGENCE_ACTIONS, OPTIMIZERS, SCHEDULES, DivergenceConfig,
                                       ProbeConfig, TrainConfig, resolve_depth)

warnings.warn("stabilitylab.train.config moved to stabilitylab.config; import TrainConfig, ProbeConfig and "
              "DivergenceConfig from there", DeprecationWarning, stacklevel=2)

__all__ = ["TrainConfig", "ProbeConfig", "DivergenceConfig", "resolve_depth", "OPTIMIZERS", "SCHEDULES",
           "DEVICES", "DIVERGENCE_ACTIONS"]
