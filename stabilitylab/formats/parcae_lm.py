"""The released Parcae checkpoints (the authors' parcae_lm format) ⇄ LoopedLM (format "parcae_lm").

A parcae_lm checkpoint is a directory:

    config.json         every ParcaeConfig / GPTConfig field; "_class_name" says which
    model.safetensors   the state dict: this file, or pytorch_model.bin, or model.pt
                        (the first present, in this order)

    model, info = load_parcae_checkpoint("parcae-140m/")        # -> (LoopedLM, ParcaeCheckpoint)
    save_parcae_checkpoint(model, "copy/", info=info)           # exact round trip
    is_parcae_checkpoint("parcae-140m/")                        # -> True

Nothing is loaded silently: every config field is mapped, checked against the one value
we implement, or known to leave the forward pass alone (listed in IGNORED); every key
of the file is mapped, checked (freqs_cis, a tied lm_head), or kept aside as unused
(below); anything else is refused with a CheckpointError naming the file, the field or
key, and the fix. A checkpoint is untrusted input: weights are read with safetensors
or torch.load(weights_only=True), which refuses any pickle that would run code.

Key map, parcae_lm → ours (P/C/D prelude/core/coda layers; a GPT's transformer.h.i is
split into P = D = L // 3 and C = L − 2·(L // 3) blocks, which run once, in order):

    transformer.wte.weight                       wte.weight
    transformer.{prelude.i | core_block.j | coda.i | h.i}.
        norm_1.weight / norm_2.weight            {prelude.i | core.j | coda.i}.norm1 / norm2.weight
        attn.c_q, c_k, c_v .weight               ….attn.qkv.weight = cat(c_q, c_k, c_v) along dim 0
        attn.c_proj.weight                       ….attn.proj.weight
        attn.ve_gate.weight                      ….attn.ve_gate.weight
        mlp.fc.weight / mlp.proj.weight          ….mlp.fc.weight / mlp.proj.weight
    transformer.ln_prelude.weight                prelude_norm.weight
    transformer.adapter.{A_log, dt_bias, B}      injection.{A_log, dt_bias, B}  ("diagonal" → parcae)
    transformer.adapter.adapter.weight           injection.W                    ("linear"   → concat)
    (no parameters)                                                             ("add"      → add)
    transformer.C.weight                         readout.weight
    transformer.ln_f.weight                      ln_f.weight
    value_embeds.i.weight                        value_embeds.i.weight
    lm_head.weight                               lm_head.weight, or tied: must equal wte
    freqs_cis                                    not loaded: must equal the RoPE table of rope_settings

Value embeddings. parcae_lm gives layer i a table when i % 2 == (L − 1) % 2 over the
L = P + C + D effective layers, but gives its attention a gate when
layer_id % 2 == (n_layer − 1) % 2, with n_layer = C · mean_backprop_depth and layer_id
= i (prelude), P + j (core), P + C · mean_recurrence + i (coda); an embedding is used
only where both exist. We load the intersection as value_embed_layers. A table without
a gate or a gate without a table (the rules disagree for some small configs) never
touches the forward pass; such dead parameters are not put into the model but kept in
info.unused, and save_parcae_checkpoint writes them back (zeros when no info is given),
so a round trip is exact. A GPT's lm_head.weight, when tied but built as a separate
unused Linear (GPT with a null use_fused_head), is kept there too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor

from stabilitylab.config import ConfigError, ModelConfig
from stabilitylab.formats.files import CheckpointError, list_keys, peek_config, read_config, read_weights
from stabilitylab.model.blocks import VE_GATE_CHANNELS, rope_table
from stabilitylab.model.looped import GPT, LoopedLM

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")  # read in this order
CONFIG_CLASSES = ("ParcaeConfig", "GPTConfig")


class KeyMapping(NamedTuple):
    """Our parameter `ours` = cat(theirs, dim 0), transposed when `transposed`; `rows` are
    the row counts of the parts (for splitting it back)."""

    ours: str
    theirs: tuple[str, ...]
    rows: tuple[int, ...] = ()
    transposed: bool = False


@dataclass
class ParcaeCheckpoint:
    """What load_parcae_checkpoint read, beside the model.

    config: config.json as read (save_parcae_checkpoint keeps its unmapped fields);
    key_map: each of our parameters and the parcae_lm keys it came from (see from_parcae);
    unused: parameters parcae_lm stores but never uses in the forward pass, by their key.
    """

    path: Path
    weights_file: str
    config_class: str
    config: dict[str, Any]
    key_map: list[KeyMapping]
    unused: dict[str, Tensor] = field(default_factory=dict)


# ---- config.json fields -------------------------------------------------------------------

# Fields with exactly one supported value, and what any other value would change.
FIXED: dict[str, tuple[Any, str]] = {
    "use_abacus": (False, "adds Abacus position embeddings"),
    "randomize_positions_from": (None, "draws random RoPE positions in training"),
    "block_class_name": ("TransformerPreNormBlock", "selects another block"),
    "norm_class_name": ("RMSNorm", "selects another norm"),
    "mlp_class_name": ("BaseMLP", "selects another MLP"),
    "bias": (False, "adds a bias to every linear layer"),
    "qk_bias": (False, "adds a learned bias to q and k"),
    "clip_qkv": (None, "clamps q, k and v"),
    "logit_softcap": (None, "soft-caps the logits, c·tanh(z/c)"),
    "mup_model_scaling_factor": (1, "rescales the widths and the logits (muP)"),
}
FIXED_PARCAE: dict[str, tuple[Any, str]] = {
    "model_class_name": ("Parcae", "selects another model class"),
    "_is_recurrent_block_config": (False, "marks a core-block sub-config, not a model"),
}

# Fields that do not change the forward pass (metadata, initialisation, kernels,
# monitoring, distributed seeds, curricula, which are refused via sampling_scheme).
IGNORED = ("name", "hf_config", "vocab_size", "padding_multiple", "attn_impl", "init_orthogonal",
           "skip_initialization", "debias_attention", "center_attention", "activation_checkpoint_impl",
           "simple_ops", "strategy")
IGNORED_PARCAE = ("lockstep_n", "lockstep_k", "curriculum_target")

# Fields we translate, with their JSON types.
MAPPED: dict[str, tuple[type, ...]] = {
    "block_size": (int,), "n_embd": (int,), "intermediate_size": (int,), "num_attention_heads": (int,),
    "num_key_value_heads": (int,), "padded_vocab_size": (int,), "rope_settings": (dict,),
    "norm_eps": (float, int), "nonlin_name": (str,), "qk_norm": (bool,), "tie_embeddings": (bool,),
    "init_strategy": (str,), "use_fused_head": (str, type(None)),
}
MAPPED_PARCAE: dict[str, tuple[type, ...]] = {
    "injection_type": (str,), "n_layers_in_prelude": (int,), "n_layers_in_recurrent_block": (int,),
    "n_layers_in_coda": (int,), "state_init": (str,), "recurrent_embedding_dimension": (int,),
    "recurrent_intermediation_embedding_dimension": (int,), "recurrent_num_attention_heads": (int, type(None)),
    "prelude_norm": (bool,), "sampling_scheme": (str,), "mean_recurrence": (int,), "mean_backprop_depth": (int,),
    "recurrent_iteration_method": (str,),
}
MAPPED_GPT: dict[str, tuple[type, ...]] = {"n_layer": (int,)}

# Our field → the config.json field it comes from (for errors that ModelConfig raises).
SOURCE_FIELDS = {
    "vocab_size": "padded_vocab_size", "d_model": "n_embd", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "d_mlp": "intermediate_size", "n_prelude": "n_layers_in_prelude",
    "n_core": "n_layers_in_recurrent_block", "n_coda": "n_layers_in_coda",
    "d_state": "recurrent_embedding_dimension", "n_state_heads": "recurrent_num_attention_heads",
    "d_state_mlp": "recurrent_intermediation_embedding_dimension", "backprop_depth": "mean_backprop_depth",
}

NONLINS = {"ReLU2": "relu2", "GELU": "gelu", "SiLU": "silu"}  # torch.nn.GELU/SiLU defaults = F.gelu/F.silu
INJECTIONS = {"diagonal": "parcae", "linear": "concat", "add": "add"}
STATE_INITS = {"like-init": "truncnormal", "zero": "zero"}
SAMPLING_SCHEMES = ("poisson-truncated-full", "fixed")  # exact names; curricula etc. are refused
ITERATION_METHODS = {"per-batch": "batch", "per-sequence": "sequence", "per-token": "token"}
# Init strategies with no embedding or logit scale whose "like-init" state has std √(2/(5·n_embd)).
INIT_STRATEGIES = ("scaled-zero", "scaled", "small", "scaled-geiping", "scaled-stuck")
FUSED_HEADS_PARCAE = ("pytorch", "cce", "full-triton", None)  # "hhe" cannot return logits

# What save_parcae_checkpoint writes for the fields a ModelConfig does not hold.
EXPORT_DEFAULTS: dict[str, Any] = {
    "name": "", "hf_config": {}, "padding_multiple": 64, "attn_impl": "flash", "init_strategy": "scaled-zero",
    "init_orthogonal": True, "skip_initialization": False, "use_fused_head": "pytorch",
    "debias_attention": False, "center_attention": False, "activation_checkpoint_impl": "per-block",
    "simple_ops": False, "strategy": "single", **{name: value for name, (value, _) in FIXED.items()},
}
EXPORT_DEFAULTS_PARCAE: dict[str, Any] = {
    "activation_checkpoint_impl": "per-iteration", "lockstep_n": False, "lockstep_k": False,
    "curriculum_target": "forward", **{name: value for name, (value, _) in FIXED_PARCAE.items()},
}


def _fields(kind: str) -> tuple[dict[str, tuple[Any, str]], tuple[str, ...], dict[str, tuple[type, ...]]]:
    """(fixed, ignored, mapped) fields of a ParcaeConfig or GPTConfig."""
    if kind == "ParcaeConfig":
        return {**FIXED, **FIXED_PARCAE}, IGNORED + IGNORED_PARCAE, {**MAPPED, **MAPPED_PARCAE}
    return FIXED, IGNORED, {**MAPPED, **MAPPED_GPT}


def _refuse(where: Path, name: str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(name, problem, fix, source=where)


def _check_fields(raw: dict[str, Any], kind: str, where: Path) -> None:
    fixed, ignored, mapped = _fields(kind)
    known = {*fixed, *ignored, *mapped, "_class_name"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _refuse(where, unknown[0], f"unknown {kind} field (unknown: {', '.join(unknown)})",
                      "parcae_lm would refuse it too; remove it or use a checkpoint written by parcae_lm")
    for name in [*fixed, *mapped]:
        if name not in raw:
            raise _refuse(where, name, "missing", f"add the field (parcae_lm's save_pretrained writes every "
                                                  f"{kind} field)")
    for name, (value, effect) in fixed.items():
        if raw[name] != value or type(raw[name]) is not type(value):
            raise _refuse(where, name, f"{raw[name]!r} {effect}, which stabilitylab does not implement",
                          f"only {json.dumps(value)} can be imported")
    for name, types in mapped.items():
        if not isinstance(raw[name], types) or (isinstance(raw[name], bool) and bool not in types):
            raise _refuse(where, name, f"{raw[name]!r} has the wrong type",
                          f"expected {' or '.join(t.__name__ for t in types)}")
    if raw.get("strategy") == "axonn_tp" and not raw.get("simple_ops"):
        raise _refuse(where, "strategy", "'axonn_tp' stores tensor-parallel shards",
                      "gather the weights and save with strategy 'single'")


def _choice(where: Path, name: str, value: Any, allowed: dict | tuple, why: str = "") -> Any:
    if value not in allowed:
        options = ", ".join(json.dumps(a) for a in allowed)
        raise _refuse(where, name, f"{value!r} is not supported{why}", f"supported: {options}")
    return allowed[value] if isinstance(allowed, dict) else value


def _check_depth_scheme(where: Path, names: tuple[str, str], scheme: str, granularity: str, mu_rec: int,
                        mu_bwd: int) -> None:
    """parcae_lm samples around max(μ_rec, μ_bwd), and per batch its poisson-truncated-full runs
    n + min(n, μ_bwd) iterations, n = max(1, Poisson(μ_rec)): neither is one of our samplers.
    `names` are the caller's names of (μ_bwd, granularity), for the message."""
    if mu_bwd > mu_rec:
        raise _refuse(where, names[0], f"{mu_bwd} > mean_recurrence {mu_rec}: parcae_lm then samples depths "
                      f"around {mu_bwd}, not {mu_rec}", "only μ_bwd ≤ μ_rec can be mapped")
    if scheme == "poisson-truncated-full" and granularity == "batch":
        raise _refuse(where, names[1], "per-batch poisson-truncated-full in parcae_lm runs n + min(n, μ_bwd) "
                      "iterations with n = max(1, Poisson(μ_rec)), which stabilitylab does not implement",
                      "use per-sequence or per-token (the released models' setting)")


def _unless(value: Any, default: Any) -> Any:
    """None when value equals the ModelConfig default, so that presets compare equal."""
    return None if value == default else value


def gpt_split(n_layer: int) -> tuple[int, int, int]:
    """A GPT's L layers as (prelude, core, coda) = (L // 3, L − 2·(L // 3), L // 3); they run once, in order."""
    outer = n_layer // 3
    return outer, n_layer - 2 * outer, outer


def _has_ve(layer_id: int, n_layer: int) -> bool:
    """parcae_lm's alternating rule: the last of n_layer layers has one, then every other."""
    return layer_id % 2 == (n_layer - 1) % 2


def value_embedding_layers(raw: dict[str, Any], kind: str) -> tuple[set[int], set[int]]:
    """(effective layers with a value-embedding table, effective layers whose attention has a
    ve_gate) under parcae_lm's rules (module docstring). A GPT's two sets are equal."""
    if kind == "GPTConfig":
        L = raw["n_layer"]
        return ({i for i in range(L) if _has_ve(i, L)},) * 2
    P, C, D = raw["n_layers_in_prelude"], raw["n_layers_in_recurrent_block"], raw["n_layers_in_coda"]
    L, n_layer, coda_id = P + C + D, C * raw["mean_backprop_depth"], P + C * raw["mean_recurrence"]
    layer_ids = [*range(P + C), *range(coda_id, coda_id + D)]
    return {i for i in range(L) if _has_ve(i, L)}, {i for i, lid in enumerate(layer_ids) if _has_ve(lid, n_layer)}


def _head_layout(raw: dict[str, Any], kind: str) -> str:
    """How lm_head.weight is stored: "tied" (the same tensor as wte), "unused" (a GPT built
    without a fused head reads the tied wte and never its lm_head), "linear" (V × d) or
    "transposed" (d × V: a GPT's head, or a Parcae "full-triton" head)."""
    fused = raw["use_fused_head"]
    if raw["tie_embeddings"]:
        return "tied" if kind == "ParcaeConfig" or fused else "unused"
    return "transposed" if kind == "GPTConfig" or fused == "full-triton" else "linear"


def model_config(raw: dict[str, Any], where: Path) -> tuple[ModelConfig, str]:
    """Translate config.json into (ModelConfig, "ParcaeConfig" | "GPTConfig"), or refuse."""
    kind = raw.get("_class_name")
    if kind not in CONFIG_CLASSES:
        guess = ' (model_class_name is "Parcae": add "_class_name": "ParcaeConfig")' \
            if raw.get("model_class_name") == "Parcae" else ""
        raise _refuse(where, "_class_name", f"{kind!r} is not a parcae_lm config class{guess}",
                      f"set it to one of {', '.join(CONFIG_CLASSES)}")
    _check_fields(raw, kind, where)
    if kind == "ParcaeConfig":
        _choice(where, "use_fused_head", raw["use_fused_head"], FUSED_HEADS_PARCAE,
                " (its head returns no logits)")
    _choice(where, "init_strategy", raw["init_strategy"], INIT_STRATEGIES,
            " (it scales the embedding or the logits, or draws the initial state with another std)")
    rope = raw["rope_settings"]
    if set(rope) != {"use_rope", "rope_condense_ratio", "rope_base"} or not isinstance(rope["use_rope"], bool) \
            or isinstance(rope["rope_base"], bool) or not isinstance(rope["rope_base"], (int, float)):
        raise _refuse(where, "rope_settings", f"{rope} is malformed",
                      'expected {"use_rope": bool, "rope_condense_ratio": int, "rope_base": number}')
    if rope["rope_condense_ratio"] != 1:
        raise _refuse(where, "rope_settings.rope_condense_ratio", f"{rope['rope_condense_ratio']!r} divides the "
                      "RoPE positions, which stabilitylab does not implement", "only 1 can be imported")
    d, heads = raw["n_embd"], raw["num_attention_heads"]
    fields: dict[str, Any] = dict(
        vocab_size=raw["padded_vocab_size"], block_size=raw["block_size"], d_model=d, n_heads=heads,
        n_kv_heads=_unless(raw["num_key_value_heads"], heads), d_mlp=_unless(raw["intermediate_size"], 4 * d),
        norm_eps=float(raw["norm_eps"]), mlp_act=_choice(where, "nonlin_name", raw["nonlin_name"], NONLINS),
        rope=rope["use_rope"], rope_base=float(rope["rope_base"]), qk_norm=raw["qk_norm"],
        tie_embeddings=raw["tie_embeddings"], norm_position="pre", norm_fp32=True)
    tables, gates = value_embedding_layers(raw, kind)
    fields.update(value_embeds=True, value_embed_layers=tuple(sorted(tables & gates)))
    if kind == "GPTConfig":
        P, C, D = gpt_split(raw["n_layer"])
        fields.update(looped=False, n_prelude=P, n_core=C, n_coda=D)
    else:
        state = raw["recurrent_embedding_dimension"]
        mu_rec, mu_bwd = raw["mean_recurrence"], raw["mean_backprop_depth"]
        scheme = _choice(where, "sampling_scheme", raw["sampling_scheme"], SAMPLING_SCHEMES)
        granularity = _choice(where, "recurrent_iteration_method", raw["recurrent_iteration_method"],
                              ITERATION_METHODS)
        _check_depth_scheme(where, ("mean_backprop_depth", "recurrent_iteration_method"), scheme, granularity,
                            mu_rec, mu_bwd)
        fields.update(
            looped=True, n_prelude=raw["n_layers_in_prelude"], n_core=raw["n_layers_in_recurrent_block"],
            n_coda=raw["n_layers_in_coda"], d_state=_unless(state, d),
            n_state_heads=_unless(raw["recurrent_num_attention_heads"], heads),
            d_state_mlp=_unless(raw["recurrent_intermediation_embedding_dimension"], 4 * state),
            injection=_choice(where, "injection_type", raw["injection_type"], INJECTIONS),
            prelude_norm=raw["prelude_norm"],
            init_state=_choice(where, "state_init", raw["state_init"], STATE_INITS),
            mean_recurrence=mu_rec, backprop_depth=mu_bwd, depth_scheme=scheme, depth_granularity=granularity)
    try:
        cfg = ModelConfig(**fields)
    except ConfigError as err:
        raise _refuse(where, SOURCE_FIELDS.get(err.field, err.field), f"{err.problem} (as our {err.field})",
                      err.fix) from None
    _check_rope_head_dims(cfg, where)
    return cfg, kind


def _check_rope_head_dims(cfg: ModelConfig, where: Path) -> None:
    """parcae_lm rotates every layer with one RoPE table, of the prelude/coda head_dim."""
    core_width, core_heads, _, _ = cfg.block_widths(core=True)
    if cfg.looped and cfg.rope and core_width // core_heads != cfg.head_dim:
        raise _refuse(where, "recurrent_num_attention_heads", f"core head_dim {core_width // core_heads} ≠ "
                      f"head_dim {cfg.head_dim}: parcae_lm applies one RoPE table of head_dim {cfg.head_dim} "
                      "to every layer, so it cannot run this model", "give the core blocks the same head_dim")


def parcae_config(cfg: ModelConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of `cfg`: its fields translated, the rest from `base` (a checkpoint's
    config.json, for exact round trips) or EXPORT_DEFAULTS. Refuses what parcae_lm cannot express."""
    where = Path("ModelConfig")
    kind = "ParcaeConfig" if cfg.looped else "GPTConfig"

    def inverse(name: str, value: Any, table: dict[str, str]) -> str:
        flipped = {ours: theirs for theirs, ours in table.items()}
        return _choice(where, name, value, flipped, " by parcae_lm")

    if cfg.norm_position != "pre" or not cfg.norm_fp32:
        name = "norm_position" if cfg.norm_position != "pre" else "norm_fp32"
        raise _refuse(where, name, f"{getattr(cfg, name)!r} is not supported by parcae_lm",
                      "parcae_lm has pre-norm blocks with RMSNorm computed in float32")
    defaults = {**EXPORT_DEFAULTS, **(EXPORT_DEFAULTS_PARCAE if cfg.looped else {})}
    raw = {**defaults, **(base or {}), "_class_name": kind}
    d_model, n_heads, n_kv_heads, d_mlp = cfg.block_widths(core=False)
    raw.update(
        block_size=cfg.block_size, n_embd=d_model, intermediate_size=d_mlp, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, padded_vocab_size=cfg.vocab_size,
        vocab_size=min(raw.get("vocab_size", cfg.vocab_size), cfg.vocab_size),
        rope_settings={"use_rope": cfg.rope, "rope_condense_ratio": 1,
                       "rope_base": int(cfg.rope_base) if float(cfg.rope_base).is_integer() else cfg.rope_base},
        norm_eps=cfg.norm_eps, nonlin_name=inverse("mlp_act", cfg.mlp_act, NONLINS), qk_norm=cfg.qk_norm,
        tie_embeddings=cfg.tie_embeddings)
    if cfg.looped:
        if cfg.init_state == "truncnormal" and not math.isclose(cfg.std, math.sqrt(2 / (5 * cfg.d_model))):
            raise _refuse(where, "init_std", f"{cfg.init_std} draws h_0 with another std than parcae_lm's "
                          f"√(2/(5·d_model))", "leave init_std unset, or use init_state = 'zero'")
        _check_depth_scheme(where, ("backprop_depth", "depth_granularity"), cfg.depth_scheme,
                            cfg.depth_granularity, cfg.mean_recurrence, cfg.mu_bwd)
        state, state_heads, _, state_mlp = cfg.block_widths(core=True)
        raw.update(
            injection_type=inverse("injection", cfg.injection, INJECTIONS), n_layers_in_prelude=cfg.n_prelude,
            n_layers_in_recurrent_block=cfg.n_core, n_layers_in_coda=cfg.n_coda,
            state_init=inverse("init_state", cfg.init_state, STATE_INITS), recurrent_embedding_dimension=state,
            recurrent_intermediation_embedding_dimension=state_mlp,
            recurrent_num_attention_heads=None if state_heads == n_heads else state_heads,
            prelude_norm=cfg.prelude_norm, sampling_scheme=_choice(where, "depth_scheme", cfg.depth_scheme,
                                                                   SAMPLING_SCHEMES, " by parcae_lm"),
            mean_recurrence=cfg.mean_recurrence, mean_backprop_depth=cfg.mu_bwd,
            recurrent_iteration_method=inverse("depth_granularity", cfg.depth_granularity, ITERATION_METHODS))
        _check_rope_head_dims(cfg, where)
    else:
        raw["n_layer"] = cfg.n_effective_layers
    tables, gates = value_embedding_layers(raw, kind)
    kv_dim = n_kv_heads * (d_model // n_heads)
    core = [i for i in cfg.ve_layers if cfg.looped and cfg.n_prelude <= i < cfg.n_prelude + cfg.n_core]
    if core and cfg.state_dim != kv_dim:
        raise _refuse(where, "value_embed_layers", f"core layer(s) {core} have value embeddings of width "
                      f"d_state = {cfg.state_dim}, but parcae_lm makes every table {kv_dim} wide (the prelude's "
                      "kv width)", "keep value embeddings out of the core, or make d_state equal that width")
    if set(cfg.ve_layers) != tables & gates:
        raise _refuse(where, "value_embed_layers", f"the model has value embeddings at layers "
                      f"{sorted(cfg.ve_layers)}, but parcae_lm applies them exactly at {sorted(tables & gates)} "
                      f"(tables at {sorted(tables)}, gates at {sorted(gates)})",
                      f"set value_embed_layers = {sorted(tables & gates)} before training")
    return raw


# ---- state dict keys ----------------------------------------------------------------------

def _block_prefixes(cfg: ModelConfig, kind: str) -> list[tuple[str, str, bool]]:
    """(our prefix, their prefix, is a core block) for every effective layer, in order."""
    P, C, D = cfg.n_prelude, cfg.n_core, cfg.n_coda
    ours = [f"prelude.{i}" for i in range(P)] + [f"core.{j}" for j in range(C)] + [f"coda.{i}" for i in range(D)]
    if kind == "GPTConfig":
        theirs = [f"transformer.h.{i}" for i in range(P + C + D)]
    else:
        theirs = ([f"transformer.prelude.{i}" for i in range(P)]
                  + [f"transformer.core_block.{j}" for j in range(C)]
                  + [f"transformer.coda.{i}" for i in range(D)])
    return [(o, t, P <= i < P + C) for i, (o, t) in enumerate(zip(ours, theirs))]


def key_map(cfg: ModelConfig, kind: str, head: str) -> list[KeyMapping]:
    """Every parameter of LoopedLM(cfg) and the parcae_lm keys it comes from."""
    maps = [KeyMapping("wte.weight", ("transformer.wte.weight",))]
    ve = set(cfg.ve_layers)
    for i, (ours, theirs, core) in enumerate(_block_prefixes(cfg, kind)):
        width, heads, kv_heads, _ = cfg.block_widths(core)
        head_dim = width // heads
        maps += [
            KeyMapping(f"{ours}.norm1.weight", (f"{theirs}.norm_1.weight",)),
            KeyMapping(f"{ours}.attn.qkv.weight", tuple(f"{theirs}.attn.c_{p}.weight" for p in "qkv"),
                       (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)),
            KeyMapping(f"{ours}.attn.proj.weight", (f"{theirs}.attn.c_proj.weight",)),
            KeyMapping(f"{ours}.norm2.weight", (f"{theirs}.norm_2.weight",)),
            KeyMapping(f"{ours}.mlp.fc.weight", (f"{theirs}.mlp.fc.weight",)),
            KeyMapping(f"{ours}.mlp.proj.weight", (f"{theirs}.mlp.proj.weight",)),
        ]
        if i in ve:
            maps += [KeyMapping(f"{ours}.attn.ve_gate.weight", (f"{theirs}.attn.ve_gate.weight",)),
                     KeyMapping(f"value_embeds.{i}.weight", (f"value_embeds.{i}.weight",))]
    maps.append(KeyMapping("ln_f.weight", ("transformer.ln_f.weight",)))
    if cfg.looped:
        if cfg.prelude_norm:
            maps.append(KeyMapping("prelude_norm.weight", ("transformer.ln_prelude.weight",)))
        maps.append(KeyMapping("readout.weight", ("transformer.C.weight",)))
        if cfg.injection == "parcae":
            maps += [KeyMapping(f"injection.{p}", (f"transformer.adapter.{p}",))
                     for p in ("A_log", "dt_bias", "B")]
        elif cfg.injection == "concat":
            maps.append(KeyMapping("injection.W", ("transformer.adapter.adapter.weight",)))
    if head in ("linear", "transposed"):
        maps.append(KeyMapping("lm_head.weight", ("lm_head.weight",), transposed=head == "transposed"))
    return maps


def unused_shapes(cfg: ModelConfig, raw: dict[str, Any], kind: str) -> dict[str, tuple[int, ...]]:
    """The keys (and shapes) parcae_lm stores but never reads in the forward pass: value-embedding
    tables without a gate, gates without a table, and an unused GPT head."""
    tables, gates = value_embedding_layers(raw, kind)
    prefixes = _block_prefixes(cfg, kind)
    kv_dim = raw["num_key_value_heads"] * (raw["n_embd"] // raw["num_attention_heads"])
    shapes = {f"value_embeds.{i}.weight": (cfg.vocab_size, kv_dim) for i in sorted(tables - gates)}
    for i in sorted(gates - tables):
        _, theirs, core = prefixes[i]
        shapes[f"{theirs}.attn.ve_gate.weight"] = (cfg.block_widths(core)[2], VE_GATE_CHANNELS)
    if _head_layout(raw, kind) == "unused":
        shapes["lm_head.weight"] = (cfg.d_model, cfg.vocab_size)
    return shapes


def from_parcae(tensors: dict[str, Tensor], maps: list[KeyMapping]) -> dict[str, Tensor]:
    """parcae_lm-named tensors → ours (concatenating q, k, v; transposing a stored-transposed head)."""
    out = {}
    for m in maps:
        t = torch.cat([tensors[k] for k in m.theirs]) if len(m.theirs) > 1 else tensors[m.theirs[0]]
        out[m.ours] = t.mT if m.transposed else t
    return out


def to_parcae(tensors: dict[str, Tensor], maps: list[KeyMapping]) -> dict[str, Tensor]:
    """Our tensors → parcae_lm-named ones, contiguous (the inverse of from_parcae)."""
    out = {}
    for m in maps:
        t = tensors[m.ours].mT if m.transposed else tensors[m.ours]
        parts = t.split(list(m.rows)) if m.rows else (t,)
        out.update({k: p.contiguous() for k, p in zip(m.theirs, parts)})
    return out


def _freqs_cis(cfg: ModelConfig) -> Tensor:
    """parcae_lm's RoPE buffer, (1, block_size, 1, head_dim/2, 2) of (cos θ, sin θ): our
    rope_table with a leading batch axis."""
    return rope_table(cfg.head_dim, cfg.block_size, cfg.rope_base)[None]


# ---- reading and writing files ------------------------------------------------------------

def _check_tensors(tensors: dict[str, Tensor], file: Path, cfg: ModelConfig, raw: dict[str, Any],
                   shapes: dict[str, tuple[int, ...]], head: str) -> None:
    """Exactly the keys of `shapes` (mapped and unused ones), with those shapes, plus a tied
    lm_head equal to the embedding and an optional freqs_cis equal to rope_settings' table
    (it is checked, not loaded)."""
    checked = {"lm_head.weight"} if head == "tied" else set()
    expected = set(shapes) | checked
    unknown, missing = set(tensors) - expected - {"freqs_cis"}, expected - set(tensors)
    if unknown:
        raise CheckpointError(sorted(unknown)[0], f"unexpected key(s) for this config: {list_keys(unknown)}",
                              "the file does not match config.json; stabilitylab loads nothing it cannot map",
                              source=file)
    if missing:
        raise CheckpointError(sorted(missing)[0], f"missing key(s): {list_keys(missing)}",
                              "the file does not match config.json (n_layers_*, injection_type, tie_embeddings?)",
                              source=file)
    integer = sorted(k for k in expected if not tensors[k].is_floating_point())
    if integer:
        raise CheckpointError(integer[0], "holds integers, not floating-point weights", "re-save the state dict",
                              source=file)
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(key, f"has shape {tuple(tensors[key].shape)}, the config needs {shape}",
                                  "the file does not match config.json", source=file)
    if "freqs_cis" in tensors:
        expect, got = _freqs_cis(cfg), tensors["freqs_cis"]
        if got.shape != expect.shape or not torch.allclose(got.float(), expect, rtol=0, atol=1e-5):
            raise CheckpointError("freqs_cis", f"(shape {tuple(got.shape)}) is not the RoPE table of "
                                  f"rope_settings {raw['rope_settings']} with head_dim {cfg.head_dim} and "
                                  f"block_size {cfg.block_size}", "fix rope_settings / block_size in config.json",
                                  source=file)
    if head == "tied" and not torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"]):
        raise CheckpointError("lm_head.weight", "differs from transformer.wte.weight although tie_embeddings "
                              "is true", "set tie_embeddings to false in config.json", source=file)


def is_parcae_config(raw: dict[str, Any]) -> bool:
    """True when a config.json names a parcae_lm config class (or, lacking "_class_name", a
    Parcae model_class_name): parcae_lm writes no model_type, so its layout says the format."""
    return raw.get("_class_name") in CONFIG_CLASSES or raw.get("model_class_name") == "Parcae"


def is_parcae_checkpoint(path: str | Path) -> bool:
    """True when `path` is a directory whose config.json is parcae_lm's (is_parcae_config): a
    cheap test for routing a path to load_parcae_checkpoint, whose errors then say what is
    missing or wrong."""
    raw = peek_config(path)
    return raw is not None and is_parcae_config(raw)


def load_parcae_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                           dtype: torch.dtype | None = None) -> tuple[LoopedLM, ParcaeCheckpoint]:
    """Load a parcae_lm checkpoint directory into a LoopedLM (a GPT for a GPTConfig), exactly or not at all.

    dtype None keeps float32 (as parcae_lm's from_pretrained). Returns (model in eval mode, info).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("path", "is not a directory", "pass the checkpoint directory (config.json + "
                              "weights)", source=path)
    raw = read_config(path, "a parcae_lm checkpoint directory holds config.json and "
                      "model.safetensors, pytorch_model.bin or model.pt")
    cfg, kind = model_config(raw, path / "config.json")
    file = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if file is None:
        raise CheckpointError("weights", f"none of {', '.join(WEIGHT_FILES)} found", "add the state dict file",
                              source=path)
    tensors = read_weights(file)
    head = _head_layout(raw, kind)
    maps = key_map(cfg, kind, head)
    unused = unused_shapes(cfg, raw, kind)
    model_class = LoopedLM if cfg.looped else GPT
    with torch.device("meta"):  # shapes only, no storage, no init
        needed = to_parcae(model_class(cfg).state_dict(), maps)
    _check_tensors(tensors, file, cfg, raw, {**unused, **{k: tuple(t.shape) for k, t in needed.items()}}, head)
    model = model_class.from_state_dict(cfg, from_parcae(tensors, maps))
    model.to(device=device, dtype=dtype).eval()
    info = ParcaeCheckpoint(path, file.name, kind, raw, maps, {k: tensors[k].clone() for k in unused})
    return model, info


load = load_parcae_checkpoint  # the registry's entry (stabilitylab.formats.load)


def save_parcae_checkpoint(model: LoopedLM, path: str | Path, info: ParcaeCheckpoint | None = None,
                           weights: str = "model.pt") -> Path:
    """Write `model` as a parcae_lm checkpoint directory: config.json + `weights` (one of WEIGHT_FILES).

    With the `info` of load_parcae_checkpoint, the unmapped config fields and the unused tensors
    are written back, so load → save → load is exact. Tensors are written in the model's dtype.
    """
    path = Path(path)
    if weights not in WEIGHT_FILES:
        raise CheckpointError("weights", f"{weights!r} is not a parcae_lm weights file",
                              f"choose one of {', '.join(WEIGHT_FILES)}")
    others = [name for name in WEIGHT_FILES if name != weights and (path / name).exists()]
    if others:
        raise CheckpointError("weights", f"{path} already holds {', '.join(others)}, which a loader would read "
                              f"instead of {weights}", "remove it or save to an empty directory", source=path)
    cfg = model.cfg
    kind = "ParcaeConfig" if cfg.looped else "GPTConfig"
    if info and info.config_class != kind:
        raise CheckpointError("info", f"comes from a {info.config_class} checkpoint, the model is a {kind}",
                              "pass the info of this model's own checkpoint, or none")
    raw = parcae_config(cfg, info.config if info else None)
    head = _head_layout(raw, kind)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = to_parcae(state, key_map(cfg, kind, head))
    if head == "tied":
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    kept = info.unused if info else {}
    for key, shape in unused_shapes(cfg, raw, kind).items():
        keep = kept.get(key)
        fits = keep is not None and tuple(keep.shape) == shape
        tensors[key] = keep if fits else state["wte.weight"].new_zeros(shape)
    tensors["freqs_cis"] = _freqs_cis(cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if weights == "model.safetensors":  # safetensors stores no shared tensors: the tied head is a copy
        save_file({k: t.clone() if k == "lm_head.weight" else t for k, t in tensors.items()}, path / weights)
    else:
        torch.save(tensors, path / weights)
    return path


__all__ = ["CheckpointError", "ParcaeCheckpoint", "load", "KeyMapping", "load_parcae_checkpoint",
           "save_parcae_checkpoint", "is_parcae_checkpoint", "is_parcae_config", "model_config", "parcae_config",
           "key_map", "from_parcae", "to_parcae", "gpt_split", "value_embedding_layers", "WEIGHT_FILES"]
