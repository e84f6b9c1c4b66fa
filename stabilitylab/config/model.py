"""The looped LM's configuration: `ModelConfig`, its presets and its derived sizes.

    cfg = ModelConfig.preset("parcae-140m", injection="concat")

The loop it describes (docs/parcae.md §1):

    e = norm(prelude(tokens));  h_0 ~ init;  h_{t+1} = core(inject(h_t, e));
    logits = head(norm(coda(C h_T)))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from stabilitylab.config.base import ConfigError, check_choice, check_numbers, number

INJECTIONS = ("add", "concat", "parcae", "parcae-zoh", "free-diagonal", "stable-dense")
INIT_STATES = ("truncnormal", "zero", "seeded")
DEPTH_SCHEMES = ("fixed", "poisson-truncated-full", "poisson-lognormal")
DEPTH_GRANULARITIES = ("batch", "sequence", "token")
MLP_ACTIVATIONS = ("relu2", "gelu", "silu")
NORM_POSITIONS = ("pre", "post")


@dataclass
class ModelConfig:
    """A looped LM (or, with `looped=False`, the fixed-depth GPT baseline).

    Defaults are the lab's small CPU setting; `ModelConfig.preset(name)` gives the
    paper's sizes. The loop (docs/parcae.md §1):

        e = norm(prelude(tokens));  h_0 ~ init;  h_{t+1} = core(inject(h_t, e));
        logits = head(norm(coda(C h_T)))
    """

    # --- vocabulary and context
    vocab_size: int = number(256, "(0, inf)")  # tokens the embedding and head cover (the tokenizer's size)
    block_size: int = number(256, "(0, inf)")  # longest sequence (length of the RoPE table)
    # --- width of prelude and coda
    d_model: int = number(128, "(0, inf)")  # residual width
    n_heads: int = number(4, "(0, inf)")  # attention heads; head_dim = d_model / n_heads (even, for RoPE)
    n_kv_heads: int | None = number(None, "(0, inf)")  # key/value heads (grouped-query); None = n_heads
    d_mlp: int | None = number(None, "(0, inf)")  # MLP hidden width; None = 4 · d_model
    # --- depth
    n_prelude: int = number(1, "[0, inf)")  # blocks before the loop (run once)
    n_core: int = number(1, "[0, inf)")  # blocks inside the loop (run every iteration)
    n_coda: int = number(1, "[0, inf)")  # blocks after the loop (run once)
    looped: bool = True  # False: the GPT baseline, prelude + core + coda run once, no injection
    # --- recurrent state
    d_state: int | None = number(None, "(0, inf)")  # width of h; None = d_model. C maps it back to d_model
    n_state_heads: int | None = number(None, "(0, inf)")  # heads of the core blocks; None = n_heads
    d_state_mlp: int | None = number(None, "(0, inf)")  # MLP width of the core blocks; None = 4 · d_state
    injection: str = "parcae"  # how e enters the loop; one of INJECTIONS (see model/injection.py)
    injection_decay: float = number(math.sqrt(1 / 5), "(0, 1)")  # diagonal Ā at init (reference √(1/5) ≈ 0.447)
    prelude_norm: bool = True  # RMSNorm on the prelude output e (Parcae's fix for late explosion)
    init_state: str = "truncnormal"  # h_0: truncnormal (reference), zero, or seeded (deterministic)
    init_state_seed: int = number(0, "[0, inf)")  # seed of the `seeded` initial state
    # --- loop depth (training samples it; evaluation uses mean_recurrence unless told)
    mean_recurrence: int = number(4, "(0, inf)")  # μ_rec, the mean number of loop iterations
    backprop_depth: int | None = number(None, "[0, inf)")  # μ_bwd, iterations with gradient; None = ⌈μ_rec/2⌉
    depth_scheme: str = "poisson-truncated-full"  # one of DEPTH_SCHEMES (model/depth.py)
    depth_granularity: str = "sequence"  # one draw per batch, per sequence, or per token
    # --- block options (each switchable for ablations; defaults = released Parcae models)
    norm_position: str = "pre"  # pre-norm (reference) or post-norm blocks
    norm_fp32: bool = True  # compute RMSNorm in float32 whatever the activation dtype
    norm_eps: float = number(1e-5, "(0, 1)")
    mlp_act: str = "relu2"  # 0.5·relu(x)² (reference), gelu or silu
    rope: bool = True  # interleaved rotary embeddings on q and k
    rope_base: float = number(50000.0, "(1, inf)")
    qk_norm: bool = True  # parameter-free RMS norm of q and k over head_dim, after RoPE
    value_embeds: bool = True  # nanochat-style value embeddings with a learned gate
    value_embed_layers: tuple[int, ...] | None = None  # effective layers with one; None = rule
    zero_init_out: bool = True  # attention and MLP out-projections start at zero
    tie_embeddings: bool = True  # lm_head shares the token embedding
    init_std: float | None = number(None, "(0, inf)")  # std of hidden weights; None = √(2 / (5 · d_model))

    def __post_init__(self) -> None:
        if isinstance(self.value_embed_layers, list):
            self.value_embed_layers = tuple(self.value_embed_layers)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def state_dim(self) -> int:
        return self.d_state or self.d_model

    @property
    def state_heads(self) -> int:
        return self.n_state_heads or self.n_heads

    @property
    def mu_bwd(self) -> int:
        return self.backprop_depth if self.backprop_depth is not None else math.ceil(self.mean_recurrence / 2)

    @property
    def n_effective_layers(self) -> int:
        """Distinct blocks: prelude + core (counted once) + coda."""
        return self.n_prelude + self.n_core + self.n_coda

    @property
    def ve_layers(self) -> tuple[int, ...]:
        """Effective layer indices that get a value embedding (docs/parcae.md §2).

        The rule: layer i has one when i % 2 == (L - 1) % 2, L = n_effective_layers,
        so the last layer always does. Prelude layer i is index i, core layer j is
        n_prelude + j, coda layer i is n_prelude + n_core + i.
        """
        if not self.value_embeds:
            return ()
        if self.value_embed_layers is not None:
            return self.value_embed_layers
        L = self.n_effective_layers
        return tuple(i for i in range(L) if i % 2 == (L - 1) % 2)

    @property
    def std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(2 / (5 * self.d_model))

    def block_widths(self, core: bool) -> tuple[int, int, int, int]:
        """(width, heads, kv heads, mlp width) of a prelude/coda block or a core block."""
        if core and self.looped:
            d = self.state_dim
            heads = self.state_heads  # the reference gives core blocks no grouped-query attention
            return d, heads, heads, self.d_state_mlp or 4 * d
        return self.d_model, self.n_heads, self.n_kv_heads or self.n_heads, self.d_mlp or 4 * self.d_model

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        check_numbers(self)
        if self.looped and self.n_core == 0:
            raise ConfigError("n_core", "a looped model needs at least one core block", "Set n_core ≥ 1")
        check_choice("injection", self.injection, INJECTIONS)
        check_choice("init_state", self.init_state, INIT_STATES)
        check_choice("depth_scheme", self.depth_scheme, DEPTH_SCHEMES)
        check_choice("depth_granularity", self.depth_granularity, DEPTH_GRANULARITIES)
        check_choice("mlp_act", self.mlp_act, MLP_ACTIVATIONS)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        for core in (False, True):
            d, heads, kv, mlp = self.block_widths(core)
            prefix = ("d_state", "n_state_heads") if core else ("d_model", "n_heads")
            if d % heads:
                raise ConfigError(prefix[1], f"{prefix[0]} = {d} is not divisible by {prefix[1]} = {heads}",
                                  f"Choose {prefix[1]} among the divisors of {d}")
            if self.rope and (d // heads) % 2:
                raise ConfigError(prefix[1], f"head_dim = {d // heads} is odd; RoPE rotates pairs",
                                  "Choose heads so that width / heads is even, or set rope = false")
            if heads % kv:
                raise ConfigError("n_kv_heads", f"{heads} query heads do not split into {kv} kv groups",
                                  "n_kv_heads must divide the number of heads")
        if self.injection == "add" and self.state_dim != self.d_model:
            raise ConfigError("injection", "'add' needs d_state == d_model",
                              "Use parcae, concat or stable-dense when the state is wider or narrower")
        bad = [i for i in self.ve_layers if not 0 <= i < self.n_effective_layers]
        if bad:
            raise ConfigError("value_embed_layers", f"layers {bad} do not exist",
                              f"Use indices in 0..{self.n_effective_layers - 1}")

    # ---- presets ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named size: `small` (the CPU default), `tiny` (tests), the paper's
        `parcae-140m|370m|770m|1.3b` and their fixed-depth `gpt-*` baselines."""
        check_choice("preset", name, PRESETS)
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _paper_size(prelude: int, width: int, heads: int, looped: bool) -> dict[str, Any]:
    """The released models (docs/parcae.md §2): P/C/D layers of equal count, head_dim 128."""
    return dict(vocab_size=32768, block_size=2048, d_model=width, n_heads=heads, n_prelude=prelude,
                n_core=prelude, n_coda=prelude, looped=looped, mean_recurrence=8, backprop_depth=4,
                depth_scheme="poisson-truncated-full", depth_granularity="sequence")


PRESETS: dict[str, dict[str, Any]] = {
    "small": {},
    "tiny": dict(vocab_size=64, block_size=32, d_model=32, n_heads=2, mean_recurrence=3),
    **{f"{arch}-{size}": _paper_size(p, w, h, arch == "parcae")
       for arch in ("parcae", "gpt")
       for size, p, w, h in (("140m", 2, 768, 6), ("370m", 4, 1024, 8),
                             ("770m", 6, 1280, 10), ("1.3b", 8, 1536, 12))},
}


__all__ = ["ModelConfig", "PRESETS", "INJECTIONS", "INIT_STATES", "DEPTH_SCHEMES", "DEPTH_GRANULARITIES",
           "MLP_ACTIVATIONS", "NORM_POSITIONS"]
