"""Parameter groups, the optimiser (AdamW, or Muon + AdamW) and the learning-rate schedule.

Groups by role follow the model's top-level modules (never parameter-name matching):

    embedding  wte, value_embeds           prelude   prelude blocks, prelude_norm
    injection  injection (Ā, B̄)            core      core blocks
    readout    readout (C)                 coda      coda blocks, ln_f, lm_head

Weight decay (decoupled, AdamW's p ← p − lr·wd·p) applies to the 2-D weights of the
blocks and to the embeddings; never to 1-D parameters (norms), the injection or C, as
in the reference (A_log, dt_bias, B and C get no weight decay).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stabilitylab.config import TrainConfig
from stabilitylab.model import LoopedLM

ROLES = {"wte": "embedding", "value_embeds": "embedding", "prelude": "prelude", "prelude_norm": "prelude",
         "injection": "injection", "core": "core", "readout": "readout", "coda": "coda", "ln_f": "coda",
         "lm_head": "coda"}
NO_DECAY_ROLES = ("injection", "readout")
BLOCK_ROLES = ("prelude", "core", "coda")  # whose 2-D weights Muon takes


def parameter_roles(model: LoopedLM) -> dict[str, list[nn.Parameter]]:
    """Parameters by role (see the module docstring); every parameter in exactly one."""
    roles: dict[str, list[nn.Parameter]] = {}
    for name, child in model.named_children():
        if name not in ROLES:
            raise ValueError(f"model module {name!r} has no role in stabilitylab.train.optim.ROLES; add it there")
        roles.setdefault(ROLES[name], []).extend(child.parameters())
    return roles


def build_optimizers(model: LoopedLM, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """[AdamW] or, with optimizer = "muon", [AdamW for the rest, Muon for 2-D block weights].
    Every group remembers its peak learning rate as `peak_lr`; set_lr scales it."""
    decay, no_decay, muon = [], [], []
    for role, params in parameter_roles(model).items():
        for p in params:
            if cfg.optimizer == "muon" and role in BLOCK_ROLES and p.ndim == 2:
                muon.append(p)
            elif p.ndim >= 2 and role not in NO_DECAY_ROLES:
                decay.append(p)
            else:
                no_decay.append(p)
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
         {"params": no_decay, "weight_decay": 0.0, "peak_lr": cfg.lr}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if not muon:
        return [adamw]
    return [adamw, torch.optim.Muon([{"params": muon, "peak_lr": cfg.muon_lr}], lr=cfg.muon_lr,
                                    weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The schedule at step s = 1..S, as a fraction of the peak learning rate.

    warmup (s ≤ W):  s / W
    trapezoid:       1, then over the last C = round(cooldown_fraction · S) steps
                     r + (1 − r) · (S − s) / C         (r = min_lr_ratio; reaches r at s = S)
    cosine:          r + (1 − r) · ½ (1 + cos(π (s − W) / (S − W)))
    """
    S, W, r = cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio
    if step <= W:
        return step / W
    if cfg.schedule == "cosine":
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (step - W) / (S - W)))
    cooldown = round(cfg.cooldown_fraction * S)
    if step > S - cooldown:
        return r + (1 - r) * (S - step) / cooldown
    return 1.0


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * factor


__all__ = ["ROLES", "parameter_roles", "build_optimizers", "lr_factor", "set_lr"]
