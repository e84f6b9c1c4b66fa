"""The looped language model (and its fixed-depth GPT baseline).

    e      = norm(prelude(tokens))            encode()
    h_0    ~ init(e)                          initial_state()
    h_t+1  = F(h_t; e) = core(inject(h_t, e)) loop_map(e)
    logits = head(norm(coda(C h_T)))          decode()

The loop map F is exposed as a pure function of h, so that the analysis
(Jacobians, Lyapunov exponents under torch.func) and the model's own forward use
the very same code. LoopedLM implements the loop interface (model/interface.py), which
is all the analysis asks of a model. With `looped=False` (the GPT baseline) the core blocks run once
between prelude and coda, with no injection and no C.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from stabilitylab.config import ModelConfig
from stabilitylab.model.blocks import Block, RMSNorm, rope_table, scaled_orthogonal_
from stabilitylab.model.depth import Depth
from stabilitylab.model.injection import make_injection
from stabilitylab.model.interface import LinearPart
from stabilitylab.records import E_NORM_MEAN, H0_NORM_MEAN, TRACE_FIELDS


@dataclass
class LoopTrace:
    """Per-iteration statistics of the loop, t = 1..T, each a float tensor of shape (T,).

    Norms are over the state channels, per token; means and maxima are over batch and
    positions. rel_residual = mean ‖h_t − h_{t−1}‖ / ‖h_t‖; cosine = mean cos(h_t, h_{t−1}).
    e_norm_mean and h0_norm_mean describe the input and the initial state.
    """

    state_norm_mean: Tensor
    state_norm_max: Tensor
    delta_norm_mean: Tensor
    rel_residual: Tensor
    cosine: Tensor
    e_norm_mean: Tensor
    h0_norm_mean: Tensor

    def to_dict(self) -> dict[str, list[float] | float]:
        """Plain Python numbers (one device sync: everything is read as one tensor)."""
        rows = [getattr(self, k).float() for k in TRACE_FIELDS]
        flat = torch.cat([*rows, self.e_norm_mean.float().view(1), self.h0_norm_mean.float().view(1)]).tolist()
        out: dict[str, list[float] | float] = {}
        for k, r in zip(TRACE_FIELDS, rows):
            out[k], flat = flat[:len(r)], flat[len(r):]
        out[E_NORM_MEAN], out[H0_NORM_MEAN] = flat
        return out


class _TraceRecorder:
    """Accumulates LoopTrace rows on the device without keeping any state."""

    def __init__(self, e: Tensor, h0: Tensor):
        self.e_norm = e.detach().norm(dim=-1).mean()
        self.h0_norm = h0.detach().norm(dim=-1).mean()
        self.rows: list[Tensor] = []

    @torch.no_grad()
    def record(self, h_new: Tensor, h_old: Tensor) -> None:
        h_new, h_old = h_new.detach().float(), h_old.detach().float()
        norm_new, norm_old = h_new.norm(dim=-1), h_old.norm(dim=-1)
        delta = (h_new - h_old).norm(dim=-1)
        tiny = torch.finfo(torch.float32).tiny
        cosine = (h_new * h_old).sum(-1) / (norm_new * norm_old).clamp_min(tiny)
        self.rows.append(torch.stack([norm_new.mean(), norm_new.max(), delta.mean(),
                                      (delta / norm_new.clamp_min(tiny)).mean(), cosine.mean()]))

    def result(self) -> LoopTrace:
        table = torch.stack(self.rows, dim=1)
        return LoopTrace(*table, e_norm_mean=self.e_norm, h0_norm_mean=self.h0_norm)


@dataclass
class LMOutput:
    """logits (B, T, V) float32; loss when targets were given; the final recurrent state
    h_T (None for GPT); the Depth that ran; the LoopTrace when asked for."""

    logits: Tensor
    loss: Tensor | None = None
    state: Tensor | None = None
    depth: Depth | None = None
    trace: LoopTrace | None = None


class LoopedLM(nn.Module):
    """prelude → optional prelude RMSNorm → h_0 → loop of (injection, core blocks) →
    readout C → coda → final RMSNorm → head (tied to the token embedding unless
    tie_embeddings is off)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        P, C, D = cfg.n_prelude, cfg.n_core, cfg.n_coda
        ve = set(cfg.ve_layers)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prelude = nn.ModuleList(Block(cfg, core=False, has_ve=i in ve) for i in range(P))
        self.core = nn.ModuleList(Block(cfg, core=True, has_ve=P + j in ve) for j in range(C))
        self.coda = nn.ModuleList(Block(cfg, core=False, has_ve=P + C + i in ve) for i in range(D))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_fp32)
        # value-embedding tables, one per effective layer in cfg.ve_layers, of that layer's kv width
        blocks = [*self.prelude, *self.core, *self.coda]
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(cfg.vocab_size, blocks[i].attn.kv_heads * blocks[i].attn.head_dim)
            for i in sorted(ve)})
        if cfg.looped:
            self.prelude_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_fp32) if cfg.prelude_norm else None
            self.injection = make_injection(cfg)
            self.readout = nn.Linear(cfg.state_dim, cfg.d_model, bias=False)  # C
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # recompute each gradient iteration in backward instead of keeping its activations: memory
        # O(one iteration) + the k states instead of O(k iterations); set by train.activation_checkpointing
        self.recompute_core = False
        self._seeded: tuple[tuple, Tensor] | None = None  # init_state "seeded": (shape, device, dtype), h_0
        for head_dim in {b.attn.head_dim for b in blocks}:
            self.register_buffer(f"rope_{head_dim}", rope_table(head_dim, cfg.block_size, cfg.rope_base),
                                 persistent=False)
        self._init_weights()

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state_dict: dict[str, Tensor],
                        device: torch.device | str = "cpu") -> "LoopedLM":
        """A model holding `state_dict`, built without the random init it would discard
        (shapes on the meta device, storage on `device`, then the weights)."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        model.load_state_dict(state_dict, strict=True)
        model.reset_buffers()
        return model

    def reset_buffers(self) -> None:
        """Recompute the constant, non-persistent buffers (RoPE tables, the injection's)."""
        with torch.no_grad():
            for name, buffer in self.named_buffers(recurse=False):
                head_dim = int(name.removeprefix("rope_"))
                buffer.copy_(rope_table(head_dim, self.cfg.block_size, self.cfg.rope_base))
            if self.cfg.looped:
                self.injection.reset_buffers()

    def _init_weights(self) -> None:
        """Embedding and C: scaled orthogonal with std √(2/(5·d_model)); value tables
        N(0, 1) and gates as torch's default (as the reference leaves them)."""
        with torch.no_grad():
            scaled_orthogonal_(self.wte.weight, self.cfg.std)
            if self.cfg.looped:
                scaled_orthogonal_(self.readout.weight, self.cfg.std)
            if self.lm_head is not None:
                scaled_orthogonal_(self.lm_head.weight, self.cfg.std)

    # ---- the loop interface's numbers ------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    @property
    def state_dim(self) -> int:
        return self.cfg.state_dim

    @property
    def mu_rec(self) -> int:
        return self.cfg.mean_recurrence

    @property
    def mu_bwd(self) -> int:
        return self.cfg.mu_bwd

    @property
    def looped(self) -> bool:
        return self.cfg.looped

    def linear_part(self) -> LinearPart | None:
        """(Ā, B̄) of the injection h ↦ Ā h + B̄ e (every injection here is linear); None for a GPT."""
        if not self.cfg.looped:
            return None
        return LinearPart(self.injection.transition(), self.injection.input_matrix())

    # ---- pieces -----------------------------------------------------------------------
    def _rope(self, block: Block) -> Tensor | None:
        return getattr(self, f"rope_{block.attn.head_dim}") if self.cfg.rope else None

    def _value_embeds(self, tokens: Tensor | None, layers: range) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for i in layers:
            if str(i) not in self.value_embeds:
                out.append(None)
            elif tokens is None:
                raise ValueError(f"layer {i} uses a value embedding, so loop_map/decode need tokens=...")
            else:
                out.append(self.value_embeds[str(i)](tokens))
        return out

    def _run(self, blocks: nn.ModuleList, x: Tensor, ves: list[Tensor | None]) -> Tensor:
        for block, ve in zip(blocks, ves):
            x = block(x, self._rope(block), ve)
        return x

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, seq_len), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds block_size {self.cfg.block_size}; "
                             "raise model.block_size or feed shorter sequences")

    def encode(self, tokens: Tensor) -> Tensor:
        """e = norm(prelude(embed(tokens))), the input injected at every iteration."""
        self._check_tokens(tokens)
        P = self.cfg.n_prelude
        x = self._run(self.prelude, self.wte(tokens), self._value_embeds(tokens, range(P)))
        if self.cfg.looped and self.prelude_norm is not None:
            x = self.prelude_norm(x)
        return x

    def initial_state(self, e: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """h_0 of shape (B, T, d_state) for the prelude output e (B, T, d_model); see draw_state."""
        return self.draw_state(e.shape[:-1], e.device, e.dtype, generator)

    def draw_state(self, batch_shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype,
                   generator: torch.Generator | None = None) -> Tensor:
        """h_0 of shape (*batch_shape, d_state): truncated normal with std √(2/(5·d_model))
        cut at ±3σ (reference), zeros, or `seeded` (the same draw every call).

        The truncated normal is fresh from torch's global RNG each call, or drawn from
        `generator` (in float32 on the generator's device, then moved) when one is given:
        the trainer passes one seeded by (seed, step), so h_0 never depends on global state.
        """
        shape = (*batch_shape, self.cfg.state_dim)
        mode = self.cfg.init_state
        if mode == "zero":
            return torch.zeros(shape, device=device, dtype=dtype)
        std = self.cfg.std
        if mode == "seeded":  # one draw, kept while shape, device and dtype stay (callers never write to h_0)
            key = (shape, torch.device(device), dtype)
            if self._seeded is None or self._seeded[0] != key:
                generator = torch.Generator(device="cpu").manual_seed(self.cfg.init_state_seed)
                h = nn.init.trunc_normal_(torch.empty(shape), std=std, a=-3 * std, b=3 * std, generator=generator)
                self._seeded = (key, h.to(device=device, dtype=dtype))
            return self._seeded[1]
        if generator is None:
            h = torch.empty(shape, device=device, dtype=dtype)
            return nn.init.trunc_normal_(h, std=std, a=-3 * std, b=3 * std)
        h = torch.empty(shape, device=generator.device)
        h = nn.init.trunc_normal_(h, std=std, a=-3 * std, b=3 * std, generator=generator)
        return h.to(device=device, dtype=dtype)

    def _loop_fn(self, e: Tensor, tokens: Tensor | None) -> Callable[[Tensor], Tensor]:
        """F(·; e) with Ā and B̄ e computed once, so calling it T times is the loop."""
        if not self.cfg.looped:
            raise ValueError("a GPT baseline (looped=False) has no loop map")
        A, u = self.injection.transition(), self.injection.drive(e)
        P, C = self.cfg.n_prelude, self.cfg.n_core
        ves = self._value_embeds(tokens, range(P, P + C))
        core, step = self.core, self.injection.step

        def loop_fn(h: Tensor) -> Tensor:
            return self._run(core, step(h, A, u), ves)

        return loop_fn

    def loop_map(self, e: Tensor, tokens: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """The pure loop map F(·; e): h ↦ core(Ā h + B̄ e), usable under torch.func.

        `tokens` is needed only when a core layer has a value embedding. It is the
        forward's own loop function, with attention on PyTorch's math kernel: the fused
        CPU flash kernel the forward uses has no forward-mode AD (jvp), so results
        agree with the forward to float rounding, not bit for bit.
        """
        loop_fn = self._loop_fn(e, tokens)

        def F(h: Tensor) -> Tensor:
            with sdpa_kernel(SDPBackend.MATH):
                return loop_fn(h)

        return F

    def decode(self, h: Tensor, tokens: Tensor | None = None) -> Tensor:
        """logits = head(norm(coda(C h))), float32."""
        P, C, D = self.cfg.n_prelude, self.cfg.n_core, self.cfg.n_coda
        x = self.readout(h) if self.cfg.looped else h
        x = self.ln_f(self._run(self.coda, x, self._value_embeds(tokens, range(P + C, P + C + D))))
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight).float()

    def loop(self, loop_fn: Callable[[Tensor], Tensor], h: Tensor, depth: Depth,
             recorder: _TraceRecorder | None = None) -> Tensor:
        """Iterate h ← F(h): depth.n_max steps without gradient, then depth.k_max with.
        Per-element depths gate the update: h ← where(t < nᵢ, F(h), h)."""
        for count, steps, grad in ((depth.n, depth.n_max, False), (depth.k, depth.k_max, True)):
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                recompute = self.recompute_core and torch.is_grad_enabled()
                for t in range(steps):
                    h_new = checkpoint(loop_fn, h, use_reentrant=False) if recompute else loop_fn(h)
                    if isinstance(count, Tensor):
                        active = (t < count).view(*count.shape, *[1] * (h.ndim - count.ndim))
                        h_new = torch.where(active, h_new, h)
                    if recorder is not None:
                        recorder.record(h_new, h)
                    h = h_new
        return h

    # ---- forward ------------------------------------------------------------------------
    def forward(self, tokens: Tensor, targets: Tensor | None = None, depth: int | Depth | None = None,
                h0: Tensor | None = None, trace: bool = False) -> LMOutput:
        """Logits (and loss with targets, ignore_index −100) for tokens (B, T).

        depth: a Depth, or an int T = T iterations of which the last min(T, μ_bwd)
        carry gradient; None = μ_rec. Sampling random depths is the trainer's job
        (model.depth.sample_depth). h0 overrides the initial state. trace=True
        adds per-iteration statistics (LoopTrace) computed on the fly.
        """
        cfg = self.cfg
        e = self.encode(tokens)
        if cfg.looped:
            if depth is None:
                depth = cfg.mean_recurrence
            depth = Depth.of(depth, cfg.mu_bwd) if not isinstance(depth, Depth) else depth.to(e.device)
            h = self.initial_state(e) if h0 is None else h0
            recorder = _TraceRecorder(e, h) if trace else None
            h = self.loop(self._loop_fn(e, tokens), h, depth, recorder)
            state, loop_trace = h, (recorder.result() if recorder else None)
        else:
            P, C = cfg.n_prelude, cfg.n_core
            h = self._run(self.core, e, self._value_embeds(tokens, range(P, P + C)))
            state, loop_trace, depth = None, None, None
        logits = self.decode(h, tokens)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, state=state, depth=depth, trace=loop_trace)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embedding else n


class GPT(LoopedLM):
    """The fixed-depth baseline: the same blocks, prelude + core + coda run once, no loop."""

    def __init__(self, cfg: ModelConfig):
        if cfg.looped:
            cfg = replace(cfg, looped=False)
        super().__init__(cfg)
