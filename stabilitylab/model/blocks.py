"""Transformer blocks as in the released Parcae models (docs/parcae.md §2, items 4–8).

    x = x + attn(norm1(x))          pre-norm (post-norm: x = norm1(x + attn(x)))
    x = x + mlp(norm2(x))           mlp(x) = proj(0.5 · relu(fc(x))²)

Attention: q, k, v from one fused projection, interleaved RoPE (base 50000) on q and
k in float32, then a parameter-free RMS norm of q and k over head_dim, causal softmax
attention with scale 1/√head_dim. An optional value embedding enters as
v += 2·σ(gate(x[..., :32])) · ve. Out-projections start at zero, so a fresh block is
the identity.

A block also runs one position at a time: given `past`, the keys and values of the
positions before it (Block.keys_values), it evaluates the next position alone, as causal
attention allows (the analysis probe's last-position map, train/probes.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stabilitylab.config import ModelConfig
from stabilitylab.config.sizes import VE_GATE_CHANNELS  # the gate reads the first 32 channels of its input
from stabilitylab.model.fused import relu_squared, rms_norm

LOW_PRECISION = (torch.float16, torch.bfloat16)  # dtypes that norms and RoPE lift to float32


def scaled_orthogonal_(weight: Tensor, std: float) -> Tensor:
    """Orthogonal init with gain std·√max(rows, cols): entries have std ≈ `std`, all
    singular values are equal (the reference's `init_orthogonal` with scaled-zero)."""
    rows, cols = weight.shape
    return nn.init.orthogonal_(weight, gain=std * math.sqrt(max(rows, cols)))


class RMSNorm(nn.Module):
    """y = w ⊙ x / √(mean(x²) + eps); with fp32=True a half-precision x is normalised in
    float32, cast back, then scaled by w (the reference's order of operations)."""

    def __init__(self, dim: int, eps: float = 1e-5, fp32: bool = True):
        super().__init__()
        self.eps, self.fp32 = eps, fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.fp32 and x.dtype in LOW_PRECISION:
            return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight
        return rms_norm(x, self.weight, self.eps)


def rope_table(head_dim: int, length: int, base: float) -> Tensor:
    """Interleaved RoPE as a real table of (cos θ, sin θ), shape (length, 1, head_dim / 2, 2), float32.

    Pair (x_{2i}, x_{2i+1}) at position p is rotated by the angle θ = p·base^(-2i/head_dim):
        x'_{2i}   = x_{2i} cos θ − x_{2i+1} sin θ
        x'_{2i+1} = x_{2i+1} cos θ + x_{2i} sin θ
    i.e. the complex product (x_{2i} + i·x_{2i+1})·e^{iθ}, written in real arithmetic so that
    torch.compile fuses it (inductor generates no code for complex numbers). The table is the
    real view of e^{iθ} = polar(1, θ): (cos θ, sin θ), the layout of the reference's freqs_cis.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[:, None]


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate x of shape (B, T, heads, head_dim) by the first T rows of `table`, in at
    least float32: (a, b) ↦ (a cos θ − b sin θ, b cos θ + a sin θ) on each interleaved pair.

    Under torch.compile this is written out in real arithmetic, which inductor fuses with
    its neighbours. Eager, the same product is one complex multiplication by the table's
    complex view (one kernel each way: 2.5–4× cheaper than the five real ones, measured
    forward + backward on a training step's q and k). The two agree to float rounding.
    """
    xf = x.float() if x.dtype in LOW_PRECISION else x
    table = table[: x.shape[-3]]
    if torch.compiler.is_compiling():
        a, b = xf.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = table.unbind(-1)
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * torch.view_as_complex(table))
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with fused qkv, RoPE, QK-norm and an optional value-embedding gate."""

    def __init__(self, cfg: ModelConfig, width: int, heads: int, kv_heads: int, has_ve: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.rope, self.qk_norm = cfg.rope, cfg.qk_norm
        q_dim, kv_dim = heads * self.head_dim, kv_heads * self.head_dim
        self.qkv = nn.Linear(width, q_dim + 2 * kv_dim, bias=False)
        self.proj = nn.Linear(q_dim, width, bias=False)
        self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, width), kv_heads, bias=False) if has_ve else None
        with torch.no_grad():  # q, k and v each get their own scaled orthogonal init
            for part in self.qkv.weight.split([q_dim, kv_dim, kv_dim]):
                scaled_orthogonal_(part, cfg.std)
            if cfg.zero_init_out:
                self.proj.weight.zero_()
            else:
                scaled_orthogonal_(self.proj.weight, cfg.std)

    def project(self, x: Tensor, rope: Tensor | None, ve: Tensor | None = None,
                start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of shape (B, T, heads, head_dim) for x holding positions start..start+T−1:
        value embedding, RoPE at those positions, QK-norm."""
        B, T, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        qk, v = self.qkv(x).view(B, T, H + 2 * Hkv, D).split([H + Hkv, Hkv], dim=2)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        if self.rope:
            qk = apply_rope(qk, rope[start:])
        if self.qk_norm:
            qk = rms_norm(qk)
        q, k = qk.split([H, Hkv], dim=2)
        return q, k, v

    def forward(self, x: Tensor, rope: Tensor | None, ve: Tensor | None = None,
                past: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Causal attention over x; with `past` = (k, v) of the P positions before x (as
        `project` returns them), x is the single position P, attending to them and itself."""
        B, T, _ = x.shape
        q, k, v = self.project(x, rope, ve, start=0 if past is None else past[0].shape[1])
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=past is None, enable_gqa=self.heads != self.kv_heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    """proj(act(fc(x))) with act = 0.5·relu(x)² (reference), gelu or silu."""

    def __init__(self, cfg: ModelConfig, width: int, hidden: int):
        super().__init__()
        self.act = cfg.mlp_act
        self.fc = nn.Linear(width, hidden, bias=False)
        self.proj = nn.Linear(hidden, width, bias=False)
        with torch.no_grad():
            scaled_orthogonal_(self.fc.weight, cfg.std)
            if cfg.zero_init_out:
                self.proj.weight.zero_()
            else:
                scaled_orthogonal_(self.proj.weight, cfg.std)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.act == "relu2":  # proj(0.5·relu(h)²) = 0.5·proj(relu(h)²): scale the narrow side
            return self.proj(relu_squared(h)).mul_(0.5)
        return self.proj(F.gelu(h) if self.act == "gelu" else F.silu(h))


class Block(nn.Module):
    """One transformer block; `core` picks the loop's widths (d_state, n_state_heads)."""

    def __init__(self, cfg: ModelConfig, core: bool, has_ve: bool):
        super().__init__()
        width, heads, kv_heads, hidden = cfg.block_widths(core)
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = RMSNorm(width, cfg.norm_eps, cfg.norm_fp32)
        self.attn = Attention(cfg, width, heads, kv_heads, has_ve)
        self.norm2 = RMSNorm(width, cfg.norm_eps, cfg.norm_fp32)
        self.mlp = MLP(cfg, width, hidden)

    def forward(self, x: Tensor, rope: Tensor | None, ve: Tensor | None = None,
                past: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The block over x (B, T, width); with `past` (see `keys_values`), x is the one
        position after them (incremental evaluation: the same numbers, to float rounding)."""
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, ve, past)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, ve, past))
        return self.norm2(x + self.mlp(x))

    def keys_values(self, x: Tensor, rope: Tensor | None, ve: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The attention's keys and values for the positions of x: `past` for the position after them."""
        _, k, v = self.attn.project(self.norm1(x) if self.pre_norm else x, rope, ve)
        return k, v
