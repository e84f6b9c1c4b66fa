"""FLOP and parameter accounting: closed forms in stabilitylab.config.sizes (torch-free, so
the dashboard and the report count without building a model), re-exported here beside the
model they describe."""

from stabilitylab.config.sizes import (FlopCount, ParameterCount, count_parameters, inference_flops_per_token,
                                       training_flops_per_token)

__all__ = ["FlopCount", "ParameterCount", "count_parameters", "training_flops_per_token",
           "inference_flops_per_token"]
