"""Ouro (model_type "ouro", ByteDance's looped LM; LoopedLMs/ouro_rl) as a loop model.

Ouro runs its whole decoder stack again on its own output, total_ut_steps times (4 for
Ouro-1.4B / 2.6B), with a final RMSNorm inside every iteration and a learned exit gate:

    e       = embed_tokens(tokens)                      encode
    h_0     = e                                         initial_state (deterministic)
    F(h)    = norm(layers(h))                           loop_map (the norm is inside the step)
    logits  = lm_head(h_t)                              decode (h_t is already normed: no second norm)
    λ_t     = σ(early_exit_gate(h_t))                   exit_probability, t = 1 … total_ut_steps

    layer:  x ← x + n₂(attn(n₁ x));  x ← x + n₄(mlp(n₃ x))
            n₁ input_layernorm, n₂ input_layernorm_2 (on the attention output),
            n₃ post_attention_layernorm, n₄ post_attention_layernorm_2 (on the MLP output)
    attention: q/k/v/o projections without bias, grouped-query (num_key_value_heads), RoPE by
            rotate_half (x ↦ x cos + [−x₂; x₁] sin, angles cat(θ, θ)), causal
    mlp:    down(silu(gate(x)) · up(x))

The exit distribution over steps is p_t = λ_t ∏_{j<t} (1 − λ_j), the last step taking what
is left (exit_distribution); the authors exit at the first step whose cumulative p reaches
early_exit_threshold (1.0: always the last).

There is no input injection: e only starts the state and F never sees it again, so
linear_part() is None and ρ(Ā) / ‖B̄‖₂ are not applicable. μ_rec = μ_bwd = total_ut_steps
(every step carries gradient in the authors' training).

Our modules carry the published parameter names (model.embed_tokens, model.layers.i.*,
model.norm, model.early_exit_gate, lm_head), so the key map is the identity. config.json
is read as data; auto_map (which names the authors' modeling file) is ignored: no file
beside the weights ever runs. Sliding-window layers are refused (no published Ouro uses them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from stabilitylab.formats.files import CheckpointError, CheckpointInfo, check_keys, read_config, read_safetensors
from stabilitylab.model.interface import Map

MODEL_TYPE = "ouro"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields with the one value we implement, and what another value would select.
FIXED: dict[str, tuple[Any, str]] = {
    "hidden_act": ("silu", "another MLP nonlinearity"),
    "use_sliding_window": (False, "sliding-window attention"),
    "rope_scaling": (None, "a scaled RoPE"),
    "attention_bias": (False, "biases on the attention projections"),
    "early_exit_step": (None, "a fixed exit step in the authors' readout"),
}
MAPPED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "total_ut_steps")
OPTIONAL = ("head_dim", "tie_word_embeddings", "early_exit_threshold", "layer_types")
# Fields that leave the forward pass alone (training, generation, metadata).
IGNORED = ("sliding_window", "max_window_layers", "attention_dropout", "initializer_range", "use_cache",
           "auto_map", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
           "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "chunk_size", "chunk_size_feed_forward",
           "id2label", "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states",
           "problem_type", "return_dict", "tokenizer_class")


@dataclass
class OuroConfig:
    """What the forward pass needs from config.json."""

    d: int
    heads: int
    kv_heads: int
    head_dim: int
    d_mlp: int
    n_layers: int
    vocab_size: int
    block_size: int
    eps: float
    rope_theta: float
    tied: bool
    mu_rec: int
    exit_threshold: float


class RMSNorm(nn.Module):
    """weight · (x / rms(x)), the normalisation in float32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


def rope_angles(inv_freq: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (length, head_dim), of the angles cat(θ, θ), θ = position · inv_freq."""
    theta = torch.outer(torch.arange(length, dtype=torch.float32, device=inv_freq.device), inv_freq.float())
    angles = torch.cat([theta, theta], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x cos + [−x₂; x₁] sin over the halves x = [x₁; x₂] of the last axis, in float32."""
    y = x.float()
    x1, x2 = y.chunk(2, dim=-1)
    return (y * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate_half_rope(q, cos, sin), rotate_half_rope(k, cos, sin)
        groups = self.heads // self.kv_heads  # query head j reads key/value head j // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """x ← x + n₂(attn(n₁ x)); x ← x + n₄(mlp(n₃ x)) (module docstring)."""

    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)
        self.input_layernorm, self.input_layernorm_2 = RMSNorm(cfg.d, cfg.eps), RMSNorm(cfg.d, cfg.eps)
        self.post_attention_layernorm = RMSNorm(cfg.d, cfg.eps)
        self.post_attention_layernorm_2 = RMSNorm(cfg.d, cfg.eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))


class OuroStack(nn.Module):
    """The published `model.*` submodule: embedding, the looped layers, the norm, the gate."""

    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d, cfg.eps)
        self.early_exit_gate = nn.Linear(cfg.d, 1)


def inverse_frequencies(cfg: OuroConfig) -> Tensor:
    """θ_i = rope_theta^(−2i / head_dim), i < head_dim / 2 (the default RoPE)."""
    return 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)


class OuroLoop(nn.Module):
    """Ouro behind the loop interface (module docstring); parameter names as published."""

    no_linear_part = ("Ouro has no input injection: e = embed(tokens) only starts the state and the whole "
                      "layer stack loops on its own output (no learned Ā, B̄)")

    def __init__(self, cfg: OuroConfig):
        super().__init__()
        self.cfg = cfg
        self.model = OuroStack(cfg)
        self.lm_head = None if cfg.tied else nn.Linear(cfg.d, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", inverse_frequencies(cfg), persistent=False)
        self.vocab_size, self.block_size, self.state_dim = cfg.vocab_size, cfg.block_size, cfg.d
        self.mu_rec = self.mu_bwd = cfg.mu_rec
        self.exit_threshold = cfg.exit_threshold  # the authors' exit rule: first t with Σ_{s≤t} p_s ≥ this

    def encode(self, tokens: Tensor) -> Tensor:
        """e = embed_tokens(tokens)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.block_size:
            raise ValueError(f"tokens must be (batch, seq_len ≤ {self.block_size}), got {tuple(tokens.shape)}")
        return self.model.embed_tokens(tokens)

    def initial_state(self, e: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """h_0 = e (deterministic: the generator is not used)."""
        return e

    def loop_map(self, e: Tensor, tokens: Tensor | None = None) -> Map:
        """F(h) = norm(layers(h)), pure (e only sets the sequence length); attention on
        PyTorch's math kernel (forward-mode AD)."""
        cos, sin = rope_angles(self.inv_freq, e.shape[1])
        layers, norm = self.model.layers, self.model.norm

        def F(h: Tensor) -> Tensor:
            with sdpa_kernel(SDPBackend.MATH):
                for layer in layers:
                    h = layer(h, cos, sin)
                return norm(h)

        return F

    def decode(self, h: Tensor, tokens: Tensor | None = None) -> Tensor:
        """logits = lm_head(h), float32 (h is a loop state, already normed by F)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight).float()

    def exit_probability(self, h: Tensor) -> Tensor:
        """λ = σ(early_exit_gate(h)), (B, T) float32: the gate's probability of exiting at a
        state h = h_t, t ≥ 1."""
        return torch.sigmoid(self.model.early_exit_gate(h).squeeze(-1).float())

    def linear_part(self) -> None:
        return None

    def forward(self, tokens: Tensor, depth: int | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """(logits, states [h_1 … h_depth], gates [λ_1 … λ_depth]) of the authors' loop, written
        as they run it (all layers, then the norm, depth times; PyTorch's default attention
        kernel); depth None = total_ut_steps."""
        h = self.encode(tokens)
        cos, sin = rope_angles(self.inv_freq, tokens.shape[1])
        states, gates = [], []
        for _ in range(self.mu_rec if depth is None else depth):
            for layer in self.model.layers:
                h = layer(h, cos, sin)
            h = self.model.norm(h)
            states.append(h)
            gates.append(self.exit_probability(h))
        return self.decode(h), states, gates


def exit_distribution(lambdas: list[Tensor]) -> Tensor:
    """(B, T, n) exit probabilities p_t = λ_t ∏_{j<t} (1 − λ_j) of n steps' gates λ_1 … λ_n,
    the last step taking the rest (so p sums to 1 over t)."""
    left, p = torch.ones_like(lambdas[0]), []
    for lam in lambdas[:-1]:
        p.append(lam * left)
        left = left * (1 - lam)
    return torch.stack([*p, left], dim=-1)


def _refuse(file: Path, name: str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(name, problem, fix, source=file)


def model_config(raw: dict[str, Any], file: Path) -> OuroConfig:
    """OuroConfig from config.json: every field mapped, fixed to the value we implement, or
    known to leave the forward alone; anything else is refused."""
    if raw.get("model_type") != MODEL_TYPE:
        raise _refuse(file, "model_type", f"{raw.get('model_type')!r}, not {MODEL_TYPE!r}",
                      "load it with its own format (stabilitylab.formats.load detects it)")
    unknown = sorted(set(raw) - set(FIXED) - set(MAPPED) - set(OPTIONAL) - set(IGNORED))
    if unknown:
        raise _refuse(file, unknown[0], f"unknown ouro field (unknown: {', '.join(unknown)})",
                      "remove it, or use a config.json written by the authors' OuroConfig")
    for name in MAPPED:
        if raw.get(name) is None:
            raise _refuse(file, name, "missing", "add the field (OuroConfig writes every field)")
    for name, (value, effect) in FIXED.items():
        if raw.get(name, value) != value:
            raise _refuse(file, name, f"{raw[name]!r} selects {effect}, which stabilitylab does not implement",
                          f"only {value!r} can be loaded")
    kinds = raw.get("layer_types") or ["full_attention"] * raw["num_hidden_layers"]
    if len(kinds) != raw["num_hidden_layers"]:
        raise _refuse(file, "layer_types", f"has {len(kinds)} entries for {raw['num_hidden_layers']} layers",
                      "give one entry per layer")
    if any(kind != "full_attention" for kind in kinds):
        i = next(i for i, kind in enumerate(kinds) if kind != "full_attention")
        raise _refuse(file, f"layer_types[{i}]", f"{kinds[i]!r}: stabilitylab implements full causal attention only",
                      "every layer must be 'full_attention' (no published Ouro uses sliding windows)")
    heads, kv_heads = raw["num_attention_heads"], raw["num_key_value_heads"]
    if heads % kv_heads:
        raise _refuse(file, "num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}",
                      "fix num_key_value_heads")
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    if head_dim % 2:
        raise _refuse(file, "head_dim", f"{head_dim} is odd", "RoPE by rotate_half needs an even head_dim")
    return OuroConfig(
        d=raw["hidden_size"], heads=heads, kv_heads=kv_heads, head_dim=head_dim, d_mlp=raw["intermediate_size"],
        n_layers=raw["num_hidden_layers"], vocab_size=raw["vocab_size"], block_size=raw["max_position_embeddings"],
        eps=float(raw["rms_norm_eps"]), rope_theta=float(raw["rope_theta"]),
        tied=bool(raw.get("tie_word_embeddings", False)), mu_rec=raw["total_ut_steps"],
        exit_threshold=float(raw.get("early_exit_threshold", 1.0)))


def _check_tensors(tensors: dict[str, Tensor], expected: dict[str, Tensor], raw: dict[str, Any], tied: bool,
                   source: Path) -> None:
    """Exactly our keys (plus lm_head.weight equal to embed_tokens when tied), with their
    shapes, in one floating dtype: config.json's dtype / torch_dtype when it names one."""
    extra = {"lm_head.weight"} if tied else set()
    check_keys(tensors, expected, source, "num_hidden_layers, tie_word_embeddings?", allowed=extra)
    named = raw.get("dtype") or raw.get("torch_dtype")
    want = DTYPES.get(named)
    counts = Counter(t.dtype for t in tensors.values())
    usual = counts.most_common(1)[0][0]
    for key, t in sorted(tensors.items()):
        if key in expected and tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(key, f"has shape {tuple(t.shape)}, config.json needs {tuple(expected[key].shape)}",
                                  "the weights do not match config.json", source=source)
        if not t.is_floating_point() or t.dtype != usual:
            raise CheckpointError(key, f"is {t.dtype} among weights of {usual}",
                                  "re-save every weight in one floating dtype", source=source)
        if want is not None and t.dtype != want:
            raise CheckpointError(key, f"is {str(t.dtype).removeprefix('torch.')} but config.json's dtype is "
                                  f"{named}", "set dtype in config.json to the weights' dtype, or re-save",
                                  source=source)
    if tied and "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"],
                                                               tensors["model.embed_tokens.weight"]):
        raise CheckpointError("lm_head.weight", "differs from model.embed_tokens.weight although "
                              "tie_word_embeddings is true", "set tie_word_embeddings to false in config.json",
                              source=source)


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> tuple[OuroLoop, CheckpointInfo]:
    """(OuroLoop in eval mode, what was read) from an Ouro directory as published; built on
    the meta device. dtype None keeps float32 (bfloat16 weights are widened)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("path", "is not a directory", "pass the checkpoint directory", source=path)
    raw = read_config(path, "an Ouro directory holds config.json and model.safetensors (or an index + shards)")
    cfg = model_config(raw, path / "config.json")
    tensors, files = read_safetensors(path)
    with torch.device("meta"):
        model = OuroLoop(cfg)
    expected = model.state_dict()
    _check_tensors(tensors, expected, raw, cfg.tied, path / files[0])
    model.load_state_dict({k: tensors[k] for k in expected}, strict=True, assign=True)
    del tensors  # the module now holds the only reference: .to() frees each stored tensor as it converts it
    model.inv_freq = inverse_frequencies(cfg)  # never stored: computed anew
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    model.inv_freq = model.inv_freq.float()  # RoPE angles stay float32 whatever the weights' dtype
    return model, CheckpointInfo(path, files, raw, MODEL_TYPE)


__all__ = ["OuroLoop", "OuroConfig", "load", "model_config", "exit_distribution", "MODEL_TYPE"]
