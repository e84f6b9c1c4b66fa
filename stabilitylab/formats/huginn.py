"""Huginn / raven (model_type "huginn_raven", seal-rg/recurrent-pretraining) as a loop model.

Huginn-0125 is a depth-recurrent transformer with sandwich-norm blocks and a concat
injection. With s = √n_embd (the embedding scale) and σ = √(2/(5·n_embd)):

    e      = prelude(s · wte(tokens))                         encode
    h_0    ~ s · TruncNormal(0, σ², ±3σ)                       initial_state ("like-init")
    F(h)   = core(W [h; e]),  W = adapter (n_embd × 2·n_embd)  loop_map
    logits = lm_head(ln_f(coda(ln_f(h_T))))                   decode (ln_f is used twice)

    sandwich block:  x ← n₂(x + attn(n₁ x));  x ← n₄(x + mlp(n₃ x))
    attention: fused Wqkv, a learned bias on q and k (qk_bias), RoPE on pairs, causal
    mlp: fc → (a, b) halves, proj(silu(a) · b)

The injection is linear: W [h; e] = W[:, :d] h + W[:, d:] e, so linear_part() is
(Ā, B̄) = (W[:, :d], W[:, d:]), free matrices: ρ(Ā) is not bounded by construction (the
unconstrained injection Parcae's analysis says can diverge). μ_rec = mean_recurrence (32
in training), μ_bwd = mean_backprop_depth (8).

Our modules carry the published parameter names, so the key map is the identity: the
file's keys are exactly this model's state dict (lm_head.weight absent when tied), plus
freqs_cis, which is checked against the RoPE table of rope_base, not loaded. config.json
is read as data; auto_map (which points at the authors' modeling file) is ignored: no
file beside the weights ever runs. Weights: model.safetensors or an index + shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from stabilitylab.formats.files import CheckpointError, CheckpointInfo, check_keys, read_config, read_safetensors
from stabilitylab.model.interface import LinearPart, Map

MODEL_TYPE = "huginn_raven"
# Fields with the one value we implement, and what another value would select.
FIXED: dict[str, tuple[Any, str]] = {
    "architecture_class_name": ("RecurrentGPT", "another architecture"),
    "block_class_name": ("SandwichBlock", "another block"),
    "norm_class_name": ("RMSNorm_llama", "another norm"),
    "mlp_class_name": ("GatedMLP", "another MLP"),
    "nonlin_name": ("SiLU", "another nonlinearity"),
    "injection_type": ("linear", "another injection"),
    "state_init": ("like-init", "another initial state"),
    "bias": (False, "biases in every linear layer"),
    "test_time_noise": (0, "noise added to the state at every iteration"),
}
MAPPED = ("n_embd", "n_heads", "block_size", "padded_vocab_size", "intermediate_size", "norm_eps", "qk_bias",
          "tie_embeddings", "n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda",
          "mean_recurrence", "mean_backprop_depth", "rope_base")
# Fields that leave the forward pass alone (training, metadata, derived values we recompute).
IGNORED = ("activation_checkpoint_impl", "init_orthogonal", "init_strategy", "init_values", "sampling_scheme",
           "padding_multiple", "effective_expected_depth", "n_layers", "vocab_size", "head_dim",
           "num_key_value_heads", "test_time_noise_type", "tie_word_embeddings", "auto_map", "architectures",
           "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "chunk_size_feed_forward",
           "id2label", "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states",
           "problem_type", "return_dict", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class HuginnConfig:
    """What the forward pass needs from config.json."""

    d: int
    heads: int
    block_size: int
    vocab_size: int
    d_mlp: int
    eps: float
    qk_bias: bool
    tied: bool
    n_prelude: int
    n_core: int
    n_coda: int
    mu_rec: int
    mu_bwd: int
    rope_base: float

    @property
    def head_dim(self) -> int:
        return self.d // self.heads


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_pairs(head_dim: int, length: int, base: float) -> Tensor:
    """(1, length, 1, head_dim/2, 2) of (cos θ, sin θ), θ = position · base^(−2i/head_dim)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None, :, None]


def rotate(x: Tensor, table: Tensor) -> Tensor:
    """RoPE on consecutive pairs (x₀, x₁) ↦ (x₀ cos − x₁ sin, x₁ cos + x₀ sin), in float32."""
    pairs = x.unflatten(-1, (-1, 2)).float()
    cos, sin = table[..., 0], table[..., 1]
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: HuginnConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.Wqkv = nn.Linear(cfg.d, 3 * cfg.d, bias=False)
        if cfg.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, cfg.heads, cfg.head_dim))
        self.proj = nn.Linear(cfg.d, cfg.d, bias=False)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.heads, self.head_dim) for t in self.Wqkv(x).split(d, dim=-1))
        if hasattr(self, "qk_bias"):
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = rotate(q, rope[:, :T]), rotate(k, rope[:, :T])
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class GatedMLP(nn.Module):
    def __init__(self, cfg: HuginnConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d, 2 * cfg.d_mlp, bias=False)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(a) * b)


class SandwichBlock(nn.Module):
    """x ← n₂(x + attn(n₁ x)); x ← n₄(x + mlp(n₃ x))."""

    def __init__(self, cfg: HuginnConfig):
        super().__init__()
        self.norm_1, self.norm_2 = RMSNorm(cfg.d, cfg.eps), RMSNorm(cfg.d, cfg.eps)
        self.norm_3, self.norm_4 = RMSNorm(cfg.d, cfg.eps), RMSNorm(cfg.d, cfg.eps)
        self.attn, self.mlp = Attention(cfg), GatedMLP(cfg)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        x = self.norm_2(x + self.attn(self.norm_1(x), rope))
        return self.norm_4(x + self.mlp(self.norm_3(x)))


class HuginnLoop(nn.Module):
    """Huginn behind the loop interface (module docstring); parameter names as published."""

    def __init__(self, cfg: HuginnConfig):
        super().__init__()
        self.cfg = cfg
        blocks = lambda n: nn.ModuleList(SandwichBlock(cfg) for _ in range(n))  # noqa: E731
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d), prelude=blocks(cfg.n_prelude),
            adapter=nn.Linear(2 * cfg.d, cfg.d, bias=False), core_block=blocks(cfg.n_core),
            coda=blocks(cfg.n_coda), ln_f=RMSNorm(cfg.d, cfg.eps)))
        self.lm_head = None if cfg.tied else nn.Linear(cfg.d, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_pairs(cfg.head_dim, cfg.block_size, cfg.rope_base), persistent=False)
        self.vocab_size, self.block_size, self.state_dim = cfg.vocab_size, cfg.block_size, cfg.d
        self.mu_rec, self.mu_bwd = cfg.mu_rec, cfg.mu_bwd
        self.scale = math.sqrt(cfg.d)  # the embedding (and initial-state) scale
        self.std = math.sqrt(2 / (5 * cfg.d))

    def _run(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        for block in blocks:
            x = block(x, self.rope)
        return x

    def encode(self, tokens: Tensor) -> Tensor:
        """e = prelude(√d · wte(tokens))."""
        if tokens.ndim != 2 or tokens.shape[1] > self.block_size:
            raise ValueError(f"tokens must be (batch, seq_len ≤ {self.block_size}), got {tuple(tokens.shape)}")
        return self._run(self.transformer.prelude, self.transformer.wte(tokens) * self.scale)

    def initial_state(self, e: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """h_0 = √d · TruncNormal(0, σ², ±3σ), σ = √(2/(5d)): fresh from the global RNG, or from
        `generator` (drawn in float32 on its device, then moved)."""
        where = generator.device if generator is not None else e.device
        h = torch.empty(e.shape, device=where)
        h = nn.init.trunc_normal_(h, std=self.std, a=-3 * self.std, b=3 * self.std, generator=generator)
        return (h * self.scale).to(device=e.device, dtype=e.dtype)

    def loop_map(self, e: Tensor, tokens: Tensor | None = None) -> Map:
        """F(h) = core(W [h; e]), pure; attention on PyTorch's math kernel (forward-mode AD)."""
        adapter, core = self.transformer.adapter, self.transformer.core_block

        def F(h: Tensor) -> Tensor:
            with sdpa_kernel(SDPBackend.MATH):
                return self._run(core, adapter(torch.cat([h, e], dim=-1)))

        return F

    def decode(self, h: Tensor, tokens: Tensor | None = None) -> Tensor:
        """logits = lm_head(ln_f(coda(ln_f(h)))), float32."""
        ln_f = self.transformer.ln_f
        x = ln_f(self._run(self.transformer.coda, ln_f(h)))
        weight = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight).float()

    def linear_part(self) -> LinearPart:
        """(Ā, B̄) = (W[:, :d], W[:, d:]) of the concat adapter."""
        W, d = self.transformer.adapter.weight, self.cfg.d
        return LinearPart(W[:, :d], W[:, d:])


def _refuse(file: Path, name: str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(name, problem, fix, source=file)


def model_config(raw: dict[str, Any], file: Path) -> HuginnConfig:
    """HuginnConfig from config.json: every field mapped, fixed to the value we implement, or
    known to leave the forward alone; anything else is refused."""
    if raw.get("model_type") != MODEL_TYPE:
        raise _refuse(file, "model_type", f"{raw.get('model_type')!r}, not {MODEL_TYPE!r}",
                      "load it with its own format (stabilitylab.formats.load detects it)")
    unknown = sorted(set(raw) - set(FIXED) - set(MAPPED) - set(IGNORED))
    if unknown:
        raise _refuse(file, unknown[0], f"unknown huginn_raven field (unknown: {', '.join(unknown)})",
                      "remove it, or use a config.json written by the authors' RavenConfig")
    for name in MAPPED:
        if name not in raw:
            raise _refuse(file, name, "missing", "add the field (RavenConfig writes every field)")
    for name, (value, effect) in FIXED.items():
        if name in raw and raw[name] != value:
            raise _refuse(file, name, f"{raw[name]!r} selects {effect}, which stabilitylab does not implement",
                          f"only {value!r} can be loaded")
    if raw.get("num_key_value_heads", raw["n_heads"]) != raw["n_heads"]:
        raise _refuse(file, "num_key_value_heads", f"{raw['num_key_value_heads']} ≠ n_heads {raw['n_heads']}",
                      "Huginn's attention has as many kv heads as heads")
    if raw["n_embd"] % raw["n_heads"]:
        raise _refuse(file, "n_heads", f"{raw['n_heads']} does not divide n_embd {raw['n_embd']}",
                      "fix n_heads or n_embd")
    return HuginnConfig(
        d=raw["n_embd"], heads=raw["n_heads"], block_size=raw["block_size"], vocab_size=raw["padded_vocab_size"],
        d_mlp=raw["intermediate_size"], eps=float(raw["norm_eps"]), qk_bias=bool(raw["qk_bias"]),
        tied=bool(raw["tie_embeddings"]), n_prelude=raw["n_layers_in_prelude"],
        n_core=raw["n_layers_in_recurrent_block"], n_coda=raw["n_layers_in_coda"], mu_rec=raw["mean_recurrence"],
        mu_bwd=raw["mean_backprop_depth"], rope_base=float(raw["rope_base"]))


def _check_tensors(tensors: dict[str, Tensor], expected: dict[str, Tensor], cfg: HuginnConfig,
                   source: Path) -> None:
    """Exactly our keys (plus freqs_cis, and lm_head.weight equal to wte when tied), with
    their shapes, in one floating dtype."""
    extra = {"freqs_cis"} | ({"lm_head.weight"} if cfg.tied else set())
    check_keys(tensors, expected, source, "n_layers_in_*, qk_bias, tie_embeddings?", allowed=extra)
    dtypes = {t.dtype for k, t in tensors.items() if k != "freqs_cis"}
    for key, t in sorted(tensors.items()):
        if key in expected and tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(key, f"has shape {tuple(t.shape)}, config.json needs {tuple(expected[key].shape)}",
                                  "the weights do not match config.json", source=source)
        if not t.is_floating_point() or (key != "freqs_cis" and len(dtypes) > 1):
            raise CheckpointError(key, f"is {t.dtype} among weights of {sorted(map(str, dtypes))}",
                                  "re-save every weight in one floating dtype", source=source)
    if "freqs_cis" in tensors:
        want = rope_pairs(cfg.head_dim, cfg.block_size, cfg.rope_base)
        got = tensors["freqs_cis"]
        if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=0, atol=1e-5):
            raise CheckpointError("freqs_cis", f"(shape {tuple(got.shape)}) is not the RoPE table of rope_base "
                                  f"{cfg.rope_base}, head_dim {cfg.head_dim}, block_size {cfg.block_size}",
                                  "fix rope_base / block_size in config.json", source=source)
    if cfg.tied and "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"],
                                                                  tensors["transformer.wte.weight"]):
        raise CheckpointError("lm_head.weight", "differs from transformer.wte.weight although tie_embeddings is "
                              "true", "set tie_embeddings to false in config.json", source=source)


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> tuple[HuginnLoop, CheckpointInfo]:
    """(HuginnLoop in eval mode, what was read) from a Huginn directory as published;
    built on the meta device. dtype None keeps float32."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("path", "is not a directory", "pass the checkpoint directory", source=path)
    raw = read_config(path, "a Huginn directory holds config.json and model.safetensors (or an index + shards)")
    cfg = model_config(raw, path / "config.json")
    tensors, files = read_safetensors(path)
    with torch.device("meta"):
        model = HuginnLoop(cfg)
    expected = model.state_dict()
    _check_tensors(tensors, expected, cfg, path / files[0])
    model.load_state_dict({k: tensors[k] for k in expected}, strict=True, assign=True)
    del tensors  # the module now holds the only reference: .to() frees each stored tensor as it converts it
    model.rope = rope_pairs(cfg.head_dim, cfg.block_size, cfg.rope_base)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    model.rope = model.rope.float()  # RoPE angles stay float32 whatever the weights' dtype
    return model, CheckpointInfo(path, files, raw, MODEL_TYPE)


__all__ = ["HuginnLoop", "HuginnConfig", "load", "model_config", "MODEL_TYPE"]
