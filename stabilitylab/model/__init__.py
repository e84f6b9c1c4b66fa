"""The looped LM family: blocks, injections, depth samplers, FLOPs."""

from stabilitylab.model.depth import Depth, fixed_depth, sample_depth
from stabilitylab.model.flops import (FlopCount, ParameterCount, count_parameters, inference_flops_per_token,
                                      training_flops_per_token)
from stabilitylab.model.injection import INJECTIONS, STABLE_BY_CONSTRUCTION, Injection, make_injection
from stabilitylab.model.interface import LinearPart, LoopModel, run_loop
from stabilitylab.model.looped import GPT, LMOutput, LoopedLM, LoopTrace

__all__ = ["Depth", "fixed_depth", "sample_depth", "FlopCount", "ParameterCount", "count_parameters",
           "inference_flops_per_token", "training_flops_per_token", "INJECTIONS", "STABLE_BY_CONSTRUCTION",
           "Injection", "make_injection", "GPT", "LMOutput", "LoopedLM", "LoopTrace", "LinearPart", "LoopModel",
           "run_loop"]
