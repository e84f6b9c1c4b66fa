"""stabilitylab: a lab for the dynamics of looped (recurrent-depth) language models.

    import stabilitylab as sl
    model = sl.LoopedLM(sl.ModelConfig(injection="parcae"))
    out = model(tokens, depth=4, trace=True)

Names are imported lazily (PEP 562), so `import stabilitylab.store` (the dashboard's
only door into the lab) does not load torch.
"""

from __future__ import annotations

from stabilitylab.lazy import lazy_namespace

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "stabilitylab.config",
    "ModelConfig": "stabilitylab.config",
    "GPT": "stabilitylab.model",
    "Depth": "stabilitylab.model",
    "LMOutput": "stabilitylab.model",
    "LoopedLM": "stabilitylab.model",
    "LoopTrace": "stabilitylab.model",
    "sample_depth": "stabilitylab.model",
}
__getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
