"""HRM-Text (model_type "hrm_text") through transformers' own HrmText classes, as a loop model.

HRM-Text (Sapient's hierarchical reasoning model for text) runs two transformer stacks, L
(fast) and H (slow), on two nested states. With e = embedding_scale · embed(tokens):

    z_H ← e,   z_L ← z_L_init                      (initial state; deterministic)
    one H-cycle F:  repeat L_cycles times:  z_L ← L(z_L + z_H)
                    then                    z_H ← H(z_H + z_L)
    logits = lm_head(z_H) after H_cycles H-cycles

Each stack ends in a weightless RMSNorm. As a loop model (model/interface.py) the state
is the flat concatenation h = [z_H; z_L] (B, T, 2·hidden_size), one iteration of F is one
H-cycle, and the trained depth μ_rec is H_cycles. There is no input injection: e only
sets z_H's start and the states meet by plain addition, so linear_part() is None and the
ρ(Ā) / ‖B̄‖₂ bounds are not applicable. Attention runs on transformers' eager kernel,
which torch.func can differentiate forward (jvp) and batch (vmap).

Prefix-LM attention (config.json's prefix_lm, true by default) is transformers' mask:
causal, except that the positions with token_type_ids == 1 (the instruction) form ONE
bidirectional block,

    allowed(b, q, k) = k ≤ q  or  (type[b, q] = 1 and type[b, k] = 1)

(modeling_hrm_text.py passes block_sequence_ids = where(type == 1, 0, −1) to
create_causal_mask, whose blockwise_overlay ORs "same group ≥ 0" into the causal mask).
Without token_type_ids it is plainly causal, as transformers' forward is. The mask is
fixed by the input, not by the state, so it enters F as a constant: loop_map(e, tokens,
token_type_ids) takes it per call; for the analyses, which call loop_map(e, tokens),
`prefix_len` = p (default 0) marks positions 0..p−1 of every sequence as the instruction.

Loading reads the directory as published: config.json (every field must be an
HrmTextConfig field) and model.safetensors or model.safetensors.index.json + shards,
whose keys fuse what transformers' modules hold apart (key_map):

    {stack}.layers.i.attn.gqkv_proj.weight   cat(self_attn.gate_proj, q_proj, k_proj, v_proj) on dim 0
    {stack}.layers.i.mlp.gate_up_proj.weight cat(mlp.gate_proj, mlp.up_proj) on dim 0
    {stack}.layers.i.attn.o_proj.weight      self_attn.o_proj
    everything else (embed_tokens, z_L_init, lm_head)   the same name

(the layout transformers' own loader converts with its hrm_text WeightConverters),
read with formats.files (JSON and safetensors only: a modeling_*.py or a pickle beside
the weights never runs; trust_remote_code is never used). The model is built on the
meta device and receives the checked tensors, so nothing is initialised twice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import HrmTextConfig, HrmTextForCausalLM
from transformers.models.hrm_text.modeling_hrm_text import HrmTextRotaryEmbedding

from stabilitylab.formats.files import CheckpointError, CheckpointInfo, check_keys, read_config, read_safetensors
from stabilitylab.model.interface import LinearPart, Map

MODEL_TYPE = "hrm_text"
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(HrmTextConfig)) | {"model_type"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HrmTextLoop(nn.Module):
    """transformers' HrmTextForCausalLM behind the loop interface (module docstring)."""

    no_linear_part = ("HRM-Text has no input injection: e only sets z_H's initial value, and the two states "
                      "meet by plain addition (no learned Ā, B̄)")

    def __init__(self, lm: HrmTextForCausalLM):
        super().__init__()
        self.lm = lm
        config = lm.config
        self.d = config.hidden_size
        self.vocab_size = config.vocab_size
        self.block_size = config.max_position_embeddings
        self.state_dim = 2 * config.hidden_size
        self.mu_rec = config.H_cycles
        self.mu_bwd = config.H_cycles  # every H-cycle carries gradient in training (L_bp_cycles limits L's)
        self.prefix_len = 0  # instruction positions when loop_map gets no token_type_ids (module docstring)

    def encode(self, tokens: Tensor) -> Tensor:
        """e = embedding_scale · embed_tokens(tokens)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.block_size:
            raise ValueError(f"tokens must be (batch, seq_len ≤ {self.block_size}), got {tuple(tokens.shape)}")
        model = self.lm.model
        return model.embed_tokens(tokens) * model.embedding_scale

    def initial_state(self, e: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[z_H; z_L] = [e; z_L_init] (deterministic: the generator is not used)."""
        z_L = self.lm.model.z_L_init.to(e).expand_as(e)
        return torch.cat([e, z_L], dim=-1)

    def token_types(self, e: Tensor, token_type_ids: Tensor | None) -> Tensor | None:
        """The (B, T) instruction marks F uses: token_type_ids as given, else positions < prefix_len
        (module docstring), else None (causal)."""
        B, T = e.shape[:2]
        if token_type_ids is None:
            if not self.prefix_len:
                return None
            token_type_ids = (torch.arange(T, device=e.device) < self.prefix_len).long().expand(B, T)
        if tuple(token_type_ids.shape) != (B, T):
            raise ValueError(f"token_type_ids must be (batch, seq_len) = {(B, T)}, got {tuple(token_type_ids.shape)}")
        if not self.lm.config.prefix_lm:
            raise ValueError("config.json's prefix_lm is false: this model attends causally only; drop "
                             "token_type_ids / set prefix_len = 0")
        return token_type_ids

    def _context(self, e: Tensor, token_type_ids: Tensor | None) -> dict[str, Any]:
        """RoPE (cos, sin) and the additive attention mask: causal, with the instruction block
        bidirectional where token types are given (module docstring)."""
        T = e.shape[1]
        positions = torch.arange(T, device=e.device)
        allowed = (positions[None, :] <= positions[:, None])[None, None]  # (1, 1, q, k)
        types = self.token_types(e, token_type_ids)
        if types is not None:
            instruction = types == 1
            allowed = allowed | (instruction[:, None, :, None] & instruction[:, None, None, :])
        mask = torch.zeros(allowed.shape, dtype=e.dtype, device=e.device).masked_fill(~allowed,
                                                                                        torch.finfo(e.dtype).min)
        return {"position_embeddings": self.lm.model.rotary_emb(e, positions[None]), "attention_mask": mask}

    def loop_map(self, e: Tensor, tokens: Tensor | None = None, token_type_ids: Tensor | None = None) -> Map:
        """F: one H-cycle on h = [z_H; z_L] (module docstring), under the prefix-LM mask of
        token_type_ids (B, T) (1 = instruction) or of prefix_len; pure, torch.func-safe."""
        context = self._context(e, token_type_ids)
        L, H, cycles, d = self.lm.model.L_module, self.lm.model.H_module, self.lm.config.L_cycles, self.d

        def F(h: Tensor) -> Tensor:
            z_H, z_L = h[..., :d], h[..., d:]
            for _ in range(cycles):
                z_L = L(z_L + z_H, **context)
            z_H = H(z_H + z_L, **context)
            return torch.cat([z_H, z_L], dim=-1)

        return F

    def decode(self, h: Tensor, tokens: Tensor | None = None) -> Tensor:
        """logits = lm_head(z_H), float32."""
        return self.lm.lm_head(h[..., :self.d]).float()

    def linear_part(self) -> LinearPart | None:
        return None


def _config(raw: dict[str, Any], file: Path) -> HrmTextConfig:
    """HrmTextConfig from config.json, refusing any field it does not define."""
    if raw.get("model_type") != MODEL_TYPE:
        raise CheckpointError("model_type", f"{raw.get('model_type')!r}, not {MODEL_TYPE!r}",
                              "load it with its own format (stabilitylab.formats.load detects it)", source=file)
    unknown = sorted(set(raw) - CONFIG_FIELDS)
    if unknown:
        fix = ("stabilitylab never runs code from a checkpoint; remove it" if unknown[0] == "auto_map" else
               "remove it, or upgrade transformers if a newer HrmTextConfig defines it")
        raise CheckpointError(unknown[0], f"unknown HrmTextConfig field (unknown: {', '.join(unknown)})", fix,
                              source=file)
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        config = HrmTextConfig(**fields)
    except (TypeError, ValueError) as err:
        first = " ".join(str(err).split())[:300]
        raise CheckpointError("config", f"rejected by HrmTextConfig: {first}", "fix the field it names",
                              source=file) from None
    config._attn_implementation = "eager"  # matmul + softmax: forward-mode AD and vmap work through it
    return config


# published suffix → the suffixes of transformers' parameters it concatenates (dim 0), in order
FUSED = ((".attn.gqkv_proj.weight", (".self_attn.gate_proj.weight", ".self_attn.q_proj.weight",
                                     ".self_attn.k_proj.weight", ".self_attn.v_proj.weight")),
         (".mlp.gate_up_proj.weight", (".mlp.gate_proj.weight", ".mlp.up_proj.weight")),
         (".attn.o_proj.weight", (".self_attn.o_proj.weight",)))


def key_map(ours: dict[str, Tensor]) -> dict[str, tuple[str, ...]]:
    """Every published key and the parameters of HrmTextForCausalLM it holds (module docstring)."""
    maps: dict[str, tuple[str, ...]] = {}
    for published, parts in FUSED:
        for key in ours:
            if key.endswith(parts[0]):
                prefix = key[:-len(parts[0])]
                maps[prefix + published] = tuple(prefix + part for part in parts)
    claimed = {k for parts in maps.values() for k in parts}
    return {**maps, **{k: (k,) for k in ours if k not in claimed}}


def published_shapes(ours: dict[str, Tensor], maps: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, ...]]:
    """The shape of every published key: its parts' shapes stacked on dim 0."""
    return {key: (sum(ours[p].shape[0] for p in parts), *ours[parts[0]].shape[1:]) for key, parts in maps.items()}


def from_published(tensors: dict[str, Tensor], maps: dict[str, tuple[str, ...]],
                   ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """Published tensors → HrmTextForCausalLM's state dict (split on dim 0 at the parts' rows)."""
    out: dict[str, Tensor] = {}
    for key, parts in maps.items():
        out.update(zip(parts, tensors[key].split([ours[p].shape[0] for p in parts])))
    return out


def _check_tensors(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], raw: dict[str, Any],
                   source: Path) -> None:
    """Exactly the expected keys, shapes, and one floating dtype (config.json's "dtype" if set)."""
    check_keys(tensors, expected, source, "num_hidden_layers, tie_word_embeddings?")
    want = DTYPES.get(raw.get("dtype"))
    for key, t in sorted(tensors.items()):
        if tuple(t.shape) != expected[key]:
            raise CheckpointError(key, f"has shape {tuple(t.shape)}, config.json needs {expected[key]}",
                                  "the weights do not match config.json", source=source)
        if not t.is_floating_point():
            raise CheckpointError(key, f"holds {t.dtype}, not floating-point weights", "re-save the weights",
                                  source=source)
        if want is not None and t.dtype != want:
            raise CheckpointError(key, f"is {str(t.dtype).removeprefix('torch.')} but config.json's dtype is "
                                  f"{raw['dtype']}", "set dtype in config.json to the weights' dtype, or re-save",
                                  source=source)


def load(path: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> tuple[HrmTextLoop, CheckpointInfo]:
    """(HrmTextLoop in eval mode, what was read) from an HRM-Text directory as published.
    dtype None keeps float32 (weights stored in bfloat16 are widened)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("path", "is not a directory", "pass the checkpoint directory (config.json + "
                              "safetensors)", source=path)
    raw = read_config(path, "an HRM-Text directory holds config.json and model.safetensors (or an index + shards)")
    config = _config(raw, path / "config.json")
    tensors, files = read_safetensors(path)
    if config.tie_word_embeddings and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    with torch.device("meta"):  # shapes only: no storage, no init
        lm = HrmTextForCausalLM(config)
    ours = lm.state_dict()
    maps = key_map(ours)
    _check_tensors(tensors, published_shapes(ours, maps), raw, path / files[0])
    lm.load_state_dict(from_published(tensors, maps, ours), strict=True, assign=True)
    del tensors  # the module now holds the only reference: .to() frees each stored tensor as it converts it
    # the non-persistent RoPE frequencies were never stored (still on meta): computed anew, in
    # float32 whatever dtype the weights get
    lm.model.rotary_emb = nn.Identity()
    model = HrmTextLoop(lm).to(device=device, dtype=dtype or torch.float32).eval()
    lm.model.rotary_emb = HrmTextRotaryEmbedding(config).to(device)
    return model, CheckpointInfo(path, files, raw, MODEL_TYPE)


__all__ = ["HrmTextLoop", "load", "key_map", "from_published", "MODEL_TYPE", "CONFIG_FIELDS"]
