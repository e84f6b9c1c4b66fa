"""stabilitylab: a lab for the dynamics of looped (recurrent-depth) language models.

    import stabilitylab as sl
    model = sl.LoopedLM(sl.ModelConfig(injection="parcae"))
    out = model(tokens, depth=4, trace=True)
"""

from stabilitylab.config import ConfigError, ModelConfig
from stabilitylab.model import GPT, Depth, LMOutput, LoopedLM, LoopTrace, sample_depth

__version__ = "0.1.0"
__all__ = ["ConfigError", "ModelConfig", "GPT", "Depth", "LMOutput", "LoopedLM", "LoopTrace", "sample_depth"]
