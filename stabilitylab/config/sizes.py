"""Parameters and FLOPs of a ModelConfig, in closed form (no torch, no model built).

Parameters by role. A block of width w, h heads of size w/h, kv key/value heads and MLP
width m holds

    2w (two RMSNorm gains) + w·(h + 2kv)·w/h (fused qkv) + w² (out-projection) + 2wm (MLP)
    + min(32, w)·kv  (the value-embedding gate, on layers that have one)

and the model is `embedding` (token table V·d and one value-embedding table V·(kv·w/h) per
layer in cfg.ve_layers; lookups, no FLOPs), `core` (the core blocks, counted once) and
`static` (everything else: prelude and coda blocks, the final norm, the prelude norm, the
injection, the readout C (d_s·d) and an untied head V·d). The injection's own parameters,
d_s = state width, d = model width:

    add 0 · concat d_s(d_s + d) · parcae, parcae-zoh 2d_s + d_s·d · free-diagonal d_s + d_s·d
    · stable-dense 2d_s + 2d_s² + d_s·d

tests/test_sizes.py checks every preset and injection against a built model.

FLOPs per token of a sequence of length T, training (forward + backward = 3 × forward),
as the reference counts them (docs/parcae.md §2, item 10):

    6·N_static + 12·d·T·(P + D)                          prelude, coda, injection, C, norms
  + (2·N_core + 4·d_s·T·C) · (n + k)                      forward of every loop iteration
  + (4·N_core + 8·d_s·T·C) · k                            backward of the k gradient iterations
  + 6·V·d                                                 the (tied) output head

attention uses the full T (no causal halving), as the authors count. The reference writes
the forward term with n alone; we count the forward pass of the k gradient iterations
too, since they run forward before they run backward. The head term is real compute that
the authors' accounting leaves out with the embedding; pass include_head=False to drop
it. A GPT baseline is the same with the core run once: 6·N + 12·d·T·L.
"""

from __future__ import annotations

from dataclasses import dataclass

from stabilitylab.config.model import ModelConfig

VE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 channels of the normed input

INJECTION_PARAMETERS = {  # (d_s, d) -> parameters of the injection (module docstring)
    "add": lambda s, d: 0,
    "concat": lambda s, d: s * (s + d),
    "parcae": lambda s, d: 2 * s + s * d,
    "parcae-zoh": lambda s, d: 2 * s + s * d,
    "free-diagonal": lambda s, d: s + s * d,
    "stable-dense": lambda s, d: 2 * s + 2 * s * s + s * d,
}


@dataclass(frozen=True)
class ParameterCount:
    """Parameters by role (embedding tables excluded from `static` and `core`)."""

    embedding: int  # token embedding and value-embedding tables (lookups: no FLOPs)
    static: int  # prelude, coda, injection, C, norms, untied head
    core: int  # the core blocks, counted once

    def unrolled(self, depth: float) -> float:
        """N(μ_rec) = N_static + μ_rec · N_core: non-embedding parameters with the core counted
        `depth` times, the N of the training law (docs/scaling.md)."""
        return self.static + depth * self.core

    @property
    def total(self) -> int:
        return self.embedding + self.static + self.core


def block_parameters(cfg: ModelConfig, core: bool, has_ve: bool) -> int:
    """Parameters of one block (module docstring)."""
    w, heads, kv, m = cfg.block_widths(core)
    head_dim = w // heads
    gate = min(VE_GATE_CHANNELS, w) * kv if has_ve else 0
    return 2 * w + w * (heads + 2 * kv) * head_dim + heads * head_dim * w + 2 * w * m + gate


def value_embedding_widths(cfg: ModelConfig) -> dict[int, int]:
    """Effective layer → width of its value-embedding table (its block's kv width)."""
    P, C = cfg.n_prelude, cfg.n_core
    widths = {}
    for i in cfg.ve_layers:
        w, heads, kv, _ = cfg.block_widths(core=P <= i < P + C)
        widths[i] = kv * (w // heads)
    return widths


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Parameters by role, in closed form (module docstring)."""
    P, C, D, d, s, V = cfg.n_prelude, cfg.n_core, cfg.n_coda, cfg.d_model, cfg.state_dim, cfg.vocab_size
    ve = set(cfg.ve_layers)
    embedding = V * d + sum(V * width for width in value_embedding_widths(cfg).values())
    core = sum(block_parameters(cfg, True, P + j in ve) for j in range(C))
    static = (sum(block_parameters(cfg, False, i in ve) for i in range(P))
              + sum(block_parameters(cfg, False, P + C + i in ve) for i in range(D))
              + d  # the final RMSNorm
              + (0 if cfg.tie_embeddings else V * d))
    if cfg.looped:
        static += (d if cfg.prelude_norm else 0) + INJECTION_PARAMETERS[cfg.injection](s, d) + s * d
    return ParameterCount(embedding=embedding, static=static, core=core)


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


__all__ = ["ParameterCount", "FlopCount", "count_parameters", "training_flops_per_token",
           "inference_flops_per_token", "block_parameters", "value_embedding_widths", "INJECTION_PARAMETERS",
           "VE_GATE_CHANNELS"]
