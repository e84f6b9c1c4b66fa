"""Training: the instrumented trainer and what it needs.

    trainer.py      train(exp, lab, run_id): the loop, top to bottom
    optim.py        parameter roles, AdamW (+ Muon), the learning-rate schedule
    probes.py       what is measured, how often
    evaluate.py     validation loss at test depths
    checkpoint.py   safetensors weights + resume state
    compiling.py    torch.compile of the blocks where it pays (train.compile = "auto")
    distributed.py  torchrun glue: DDP, or FSDP2 (train.parallel = "fsdp")
    sweep.py        a grid of runs, resumable, in parallel processes (longest first)
    slurm.py        the same grid as one Slurm job array (submitit, optional)

The configs (TrainConfig, ProbeConfig, DivergenceConfig) live in stabilitylab.config; the
divergence rules and their checkpointed state in stabilitylab.analysis.divergence (the
monitor applies the same ones to any training loop).
"""

from stabilitylab.config import DivergenceConfig, ProbeConfig, TrainConfig
from stabilitylab.train.evaluate import eval_run
from stabilitylab.train.sweep import run_sweep
from stabilitylab.train.trainer import train

__all__ = ["TrainConfig", "ProbeConfig", "DivergenceConfig", "train", "run_sweep", "eval_run"]
