"""Configuration: dataclasses in, clear errors out.

Every config is a plain dataclass whose defaults are the lab's small CPU setting.
`from_dict` builds one from a TOML table and turns every mistake (an unknown field,
a wrong type, a value outside the allowed set) into a `ConfigError` that names the
file, the field, the allowed values and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value. The message names the field, the source and the fix."""

    def __init__(self, field: str, problem: str, fix: str = "", source: str | Path | None = None):
        self.field, self.problem, self.fix, self.source = field, problem, fix, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {problem}" + (f". {fix}" if fix else ""))

    def located(self, source: str | Path | None, section: str = "") -> "ConfigError":
        """The same error, with the file and the TOML section it came from."""
        name = f"{section}.{self.field}" if section and not self.field.startswith(section + ".") else self.field
        return ConfigError(name, self.problem, self.fix, source or self.source)


def read_toml(path: str | Path, field: str, example: str) -> dict[str, Any]:
    """The tables of a TOML file. A missing, unreadable or malformed file raises a ConfigError
    that names the file and what to pass instead (e.g. `example`)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(field, f"{path} does not exist", f"Pass a TOML file, e.g. {example}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(field, f"cannot read {path} ({err})", "Pass a readable TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("syntax", f"not valid TOML: {err}", "Fix the line it names", source=path) from None


def check_choice(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    """Raise a ConfigError unless `value` is one of `allowed` (with a did-you-mean)."""
    allowed = list(allowed)
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(name, f"{value!r} is not allowed", f"{hint}Allowed: {', '.join(map(str, allowed))}")


def check_positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ConfigError(name, f"must be {bound}, got {value!r}", f"Set {name} to a value {bound}")


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
    paper's sizes. The loop (PARCAE.md §1):

        e = norm(prelude(tokens));  h_0 ~ init;  h_{t+1} = core(inject(h_t, e));
        logits = head(norm(coda(C h_T)))
    """

    # --- vocabulary and context
    vocab_size: int = 256  # tokens the embedding and tied head cover (the tokenizer's size)
    block_size: int = 256  # longest sequence (length of the RoPE table)
    # --- width of prelude and coda
    d_model: int = 128  # residual width
    n_heads: int = 4  # attention heads; head_dim = d_model / n_heads (even, for RoPE)
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    d_mlp: int | None = None  # MLP hidden width; None = 4 · d_model
    # --- depth
    n_prelude: int = 1  # blocks before the loop (run once)
    n_core: int = 1  # blocks inside the loop (run every iteration)
    n_coda: int = 1  # blocks after the loop (run once)
    looped: bool = True  # False: the GPT baseline, prelude + core + coda run once, no injection
    # --- recurrent state
    d_state: int | None = None  # width of h; None = d_model. C maps it back to d_model
    n_state_heads: int | None = None  # heads of the core blocks; None = n_heads
    d_state_mlp: int | None = None  # MLP width of the core blocks; None = 4 · d_state
    injection: str = "parcae"  # how e enters the loop; one of INJECTIONS (see model/injection.py)
    injection_decay: float = math.sqrt(1 / 5)  # diagonal Ā at init (reference: √(1/5) ≈ 0.447)
    prelude_norm: bool = True  # RMSNorm on the prelude output e (Parcae's fix for late explosion)
    init_state: str = "truncnormal"  # h_0: truncnormal (reference), zero, or seeded (deterministic)
    init_state_seed: int = 0  # seed of the `seeded` initial state
    # --- loop depth (training samples it; evaluation uses mean_recurrence unless told)
    mean_recurrence: int = 4  # μ_rec, the mean number of loop iterations
    backprop_depth: int | None = None  # μ_bwd, iterations that carry gradient; None = ceil(μ_rec/2)
    depth_scheme: str = "poisson-truncated-full"  # one of DEPTH_SCHEMES (model/depth.py)
    depth_granularity: str = "sequence"  # one draw per batch, per sequence, or per token
    # --- block options (each switchable for ablations; defaults = released Parcae models)
    norm_position: str = "pre"  # pre-norm (reference) or post-norm blocks
    norm_fp32: bool = True  # compute RMSNorm in float32 whatever the activation dtype
    norm_eps: float = 1e-5
    mlp_act: str = "relu2"  # 0.5·relu(x)² (reference), gelu or silu
    rope: bool = True  # interleaved rotary embeddings on q and k
    rope_base: float = 50000.0
    qk_norm: bool = True  # parameter-free RMS norm of q and k over head_dim, after RoPE
    value_embeds: bool = True  # nanochat-style value embeddings with a learned gate
    value_embed_layers: tuple[int, ...] | None = None  # effective layers with one; None = rule
    zero_init_out: bool = True  # attention and MLP out-projections start at zero
    tie_embeddings: bool = True  # lm_head shares the token embedding
    init_std: float | None = None  # std of hidden weights; None = sqrt(2 / (5 · d_model))

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
        """Effective layer indices that get a value embedding (PARCAE.md §2.6).

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
        for name in ("vocab_size", "block_size", "d_model", "n_heads", "mean_recurrence"):
            check_positive(name, getattr(self, name))
        for name in ("n_prelude", "n_core", "n_coda"):
            check_positive(name, getattr(self, name), allow_zero=True)
        if self.looped and self.n_core == 0:
            raise ConfigError("n_core", "a looped model needs at least one core block", "Set n_core ≥ 1")
        check_positive("backprop_depth", self.mu_bwd, allow_zero=True)
        check_choice("injection", self.injection, INJECTIONS)
        check_choice("init_state", self.init_state, INIT_STATES)
        check_choice("depth_scheme", self.depth_scheme, DEPTH_SCHEMES)
        check_choice("depth_granularity", self.depth_granularity, DEPTH_GRANULARITIES)
        check_choice("mlp_act", self.mlp_act, MLP_ACTIVATIONS)
        check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        if not 0.0 < self.injection_decay < 1.0:
            raise ConfigError("injection_decay", f"must lie in (0, 1), got {self.injection_decay}",
                              "It is the diagonal of Ā at init; the reference uses 0.447")
        for core in (False, True):
            d, heads, kv, mlp = self.block_widths(core)
            prefix = ("d_state", "n_state_heads") if core else ("d_model", "n_heads")
            check_positive(prefix[0], d)
            check_positive(prefix[1], heads)
            if d % heads:
                raise ConfigError(prefix[1], f"{prefix[0]} = {d} is not divisible by {prefix[1]} = {heads}",
                                  f"Choose {prefix[1]} among the divisors of {d}")
            if self.rope and (d // heads) % 2:
                raise ConfigError(prefix[1], f"head_dim = {d // heads} is odd; RoPE rotates pairs",
                                  "Choose heads so that width / heads is even, or set rope = false")
            if heads % kv:
                raise ConfigError("n_kv_heads", f"{heads} query heads do not split into {kv} kv groups",
                                  "n_kv_heads must divide the number of heads")
            check_positive("d_mlp", mlp)
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
    """The released models (PARCAE.md §2): P/C/D layers of equal count, head_dim 128."""
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


# ---- building dataclasses from TOML tables --------------------------------------------

def _type_ok(value: Any, annotation: Any) -> bool:
    """Does a TOML value fit a dataclass field annotation (ints are accepted as floats)?"""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation)


def from_dict(cls: type, data: dict[str, Any], source: str | Path | None = None, section: str = ""):
    """Build dataclass `cls` from a mapping; every error names the file, field and fix."""
    if not isinstance(data, dict):
        raise ConfigError(section or cls.__name__, f"expected a table, got {type(data).__name__}",
                          source=source)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(key, "unknown field", f"{hint}Known fields: {', '.join(sorted(fields))}"
                              ).located(source, section)
        if not _type_ok(value, hints[key]):
            raise ConfigError(key, f"{value!r} has the wrong type",
                              f"Expected {_type_name(hints[key])}").located(source, section)
    try:
        return cls(**data)
    except ConfigError as err:
        raise err.located(source, section) from None


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


__all__ = ["ConfigError", "ModelConfig", "PRESETS", "from_dict", "check_choice", "check_positive",
           "INJECTIONS", "INIT_STATES", "DEPTH_SCHEMES", "DEPTH_GRANULARITIES"]
