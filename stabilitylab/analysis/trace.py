"""The loop trace of any loop model (model/interface.py), run through the interface: the same
LoopTrace the trainer's probe records for LoopedLM (per iteration mean/max ‖h_t‖, mean
‖h_t − h_{t−1}‖, rel_residual, cosine), so `stabilitylab trace` reads a Huginn or HRM-Text
directory the way it reads our own models."""

from __future__ import annotations

import torch
from torch import Tensor

from stabilitylab.model.interface import LoopModel
from stabilitylab.model.looped import LoopTrace


@torch.no_grad()
def interface_trace(model: LoopModel, tokens: Tensor, depth: int, h0: Tensor | None = None) -> LoopTrace:
    """Run `depth` iterations from h0 (default initial_state(e)) and summarise each one."""
    e = model.encode(tokens)
    F = model.loop_map(e, tokens)
    h = model.initial_state(e) if h0 is None else h0
    h0_norm = h.float().norm(dim=-1).mean()
    rows: dict[str, list[Tensor]] = {k: [] for k in ("mean", "max", "delta", "rel", "cos")}
    for _ in range(depth):
        new = F(h)
        n, d = new.float().norm(dim=-1), (new - h).float().norm(dim=-1)
        rows["mean"].append(n.mean())
        rows["max"].append(n.max())
        rows["delta"].append(d.mean())
        rows["rel"].append((d / n.clamp_min(1e-30)).mean())
        rows["cos"].append(torch.nn.functional.cosine_similarity(new.float(), h.float(), dim=-1).mean())
        h = new
    s = {k: torch.stack(v) for k, v in rows.items()}
    return LoopTrace(s["mean"], s["max"], s["delta"], s["rel"], s["cos"], e.float().norm(dim=-1).mean(), h0_norm)


__all__ = ["interface_trace"]
