"""FLOP accounting for looped and fixed-depth models (PARCAE.md §2.10).

Per token of a sequence of length T, training (forward + backward = 3 × forward):

    6·N_static + 12·d·T·(P + D)                          prelude, coda, injection, C, norms
  + (2·N_core + 4·d_s·T·C) · (n + k)                      forward of every loop iteration
  + (4·N_core + 8·d_s·T·C) · k                            backward of the k gradient iterations
  + 6·V·d                                                 the (tied) output head

N_core counts the core blocks' parameters once; N_static all other non-embedding
parameters; attention uses the full T (no causal halving), as the authors count.
PARCAE.md writes the forward term with n alone; we count the forward pass of the k
gradient iterations too, since they run forward before they run backward. The head
term is real compute that the authors' accounting leaves out with the embedding;
pass include_head=False to drop it. A GPT baseline is the same with the core run
once: 6·N + 12·d·T·L.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stabilitylab.config import ModelConfig
from stabilitylab.model.looped import LoopedLM


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by role (embedding tables excluded from `static` and `core`)."""

    embedding: int  # token embedding and value-embedding tables (lookups: no FLOPs)
    static: int  # prelude, coda, injection, C, norms, untied head
    core: int  # the core blocks, counted once

    def unrolled(self, depth: float) -> float:
        """N(μ_rec): non-embedding parameters with the core counted `depth` times, the N
        of the paper's training law."""
        return self.static + depth * self.core


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Count parameters by role without allocating them (a meta-device model)."""
    with torch.device("meta"):
        model = LoopedLM(cfg)
    embedding = model.wte.weight.numel() + sum(p.numel() for p in model.value_embeds.parameters())
    core = sum(p.numel() for p in model.core.parameters())
    total = sum(p.numel() for p in model.parameters())
    return ParameterCount(embedding=embedding, static=total - embedding - core, core=core)


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs per token, by term; `total` is their sum."""

    static: float
    core_forward: float
    core_backward: float
    head: float

    @property
    def total(self) -> float:
        return self.static + self.core_forward + self.core_backward + self.head


def training_flops_per_token(cfg: ModelConfig, seq_len: int, n: float | None = None, k: float | None = None,
                             include_head: bool = True, params: ParameterCount | None = None) -> FlopCount:
    """FLOPs per token of one training step with n no-grad and k grad iterations
    (means over the batch; default the fixed split μ_rec − μ_bwd, μ_bwd)."""
    params = params or count_parameters(cfg)
    d, d_s, T = cfg.d_model, cfg.state_dim, seq_len
    static = 6 * params.static + 12 * d * T * (cfg.n_prelude + cfg.n_coda)
    head = 6 * cfg.vocab_size * d if include_head else 0.0
    core_fwd_once = 2 * params.core + 4 * d_s * T * cfg.n_core
    if not cfg.looped:  # the core runs once, forward and backward
        return FlopCount(static, core_fwd_once, 2 * core_fwd_once, head)
    if n is None or k is None:
        k = min(cfg.mu_bwd, cfg.mean_recurrence)
        n = cfg.mean_recurrence - k
    return FlopCount(static, core_fwd_once * (n + k), 2 * core_fwd_once * k, head)


def inference_flops_per_token(cfg: ModelConfig, seq_len: int, depth: int | None = None,
                              include_head: bool = True, params: ParameterCount | None = None) -> float:
    """Forward-only FLOPs per token at a test-time depth (default μ_rec)."""
    params = params or count_parameters(cfg)
    d, d_s, T = cfg.d_model, cfg.state_dim, seq_len
    iterations = (depth or cfg.mean_recurrence) if cfg.looped else 1
    return (2 * params.static + 4 * d * T * (cfg.n_prelude + cfg.n_coda)
            + (2 * params.core + 4 * d_s * T * cfg.n_core) * iterations
            + (2 * cfg.vocab_size * d if include_head else 0.0))
