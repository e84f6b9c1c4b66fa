"""Training: the instrumented trainer and what it needs.

    config.py       TrainConfig, ProbeConfig, DivergenceConfig
    trainer.py      train(exp, lab, run_id): the loop, top to bottom
    optim.py        parameter roles, AdamW (+ Muon), the learning-rate schedule
    probes.py       what is measured, how often
    divergence.py   divergence rules and loss spikes
    evaluate.py     validation loss at test depths
    checkpoint.py   safetensors weights + resume state
    distributed.py  torchrun / DDP glue
    sweep.py        a grid of runs, resumable, in parallel processes

Names are imported lazily (PEP 562), so `stabilitylab.experiment` can import
`stabilitylab.train.config` without loading the trainer.
"""

from __future__ import annotations

from stabilitylab.lazy import lazy_namespace

_EXPORTS = {
    "TrainConfig": "stabilitylab.train.config",
    "ProbeConfig": "stabilitylab.train.config",
    "DivergenceConfig": "stabilitylab.train.config",
    "train": "stabilitylab.train.trainer",
    "run_sweep": "stabilitylab.train.sweep",
    "eval_run": "stabilitylab.train.evaluate",
}
__getattr__, __dir__, __all__ = lazy_namespace(__name__, _EXPORTS)
