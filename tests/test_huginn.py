"""Huginn / raven (formats/huginn.py): the published layout loads into the loop interface with
Ā = W[:, :d], B̄ = W[:, d:]; bad input is refused naming file, key and fix; and, when
STABILITYLAB_HUGINN_REF points at a folder holding the authors' recpre/raven_modeling_minimal.py
and recpre/raven_config_minimal.py (docs/formats.md says how to fetch them), the same logits
and the same T-step states as their RavenForCausalLM."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stabilitylab import formats
from stabilitylab.analysis.bounds import rho_bound
from stabilitylab.formats.files import CheckpointError
from stabilitylab.formats.huginn import HuginnLoop, model_config, rope_pairs
from stabilitylab.model import LoopModel, run_loop

REF = os.environ.get("STABILITYLAB_HUGINN_REF")
needs_ref = pytest.mark.skipif(not REF, reason="STABILITYLAB_HUGINN_REF is unset: point it at a folder holding "
                                               "recpre/raven_modeling_minimal.py (docs/formats.md)")
SMALL = dict(n_embd=32, n_heads=2, n_layers=4, block_size=16, vocab_size=64, intermediate_size=48,
             n_layers_in_recurrent_block=2, n_layers_in_prelude=1, n_layers_in_coda=1, mean_recurrence=4,
             mean_backprop_depth=2)


def config_json(**overrides) -> dict:
    """config.json as the authors' RavenConfig writes it (its fields, their defaults)."""
    f = {**SMALL, **overrides}
    return {"architecture_class_name": "RecurrentGPT", "architectures": ["RavenForCausalLM"],
            "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                         "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
            "bias": False, "block_class_name": "SandwichBlock", "block_size": f["block_size"], "dtype": "float32",
            "head_dim": f["n_embd"] // f["n_heads"], "init_strategy": "takase", "injection_type": "linear",
            "intermediate_size": f["intermediate_size"], "mean_backprop_depth": f["mean_backprop_depth"],
            "mean_recurrence": f["mean_recurrence"], "mlp_class_name": "GatedMLP", "model_type": "huginn_raven",
            "n_embd": f["n_embd"], "n_heads": f["n_heads"], "n_layers": f["n_layers"],
            "n_layers_in_coda": f["n_layers_in_coda"], "n_layers_in_prelude": f["n_layers_in_prelude"],
            "n_layers_in_recurrent_block": f["n_layers_in_recurrent_block"], "nonlin_name": "SiLU",
            "norm_class_name": "RMSNorm_llama", "norm_eps": 1e-6, "num_key_value_heads": f["n_heads"],
            "padded_vocab_size": f["vocab_size"], "qk_bias": True, "rope_base": 50000, "state_init": "like-init",
            "test_time_noise": 0, "test_time_noise_type": "fixed", "tie_embeddings": f.get("tie_embeddings", True),
            "tie_word_embeddings": f.get("tie_embeddings", True), "vocab_size": f["vocab_size"]}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 1 / math.sqrt(p.shape[-1])
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen) if p.ndim == 1 else
                    torch.randn(p.shape, generator=gen) * scale)
    return module


def write(path: Path, seed: int = 0, **overrides) -> HuginnLoop:
    """A random Huginn written in the published layout (config.json + model.safetensors with freqs_cis)."""
    raw = config_json(**overrides)
    path.mkdir(parents=True, exist_ok=True)
    model = randomize_(HuginnLoop(model_config(raw, path / "config.json")), seed).eval()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["freqs_cis"] = rope_pairs(model.cfg.head_dim, model.cfg.block_size, model.cfg.rope_base)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(raw))
    return model


def test_the_published_layout_loads_into_the_loop_interface(tmp_path):
    ours = write(tmp_path / "h")
    model, info = formats.load(tmp_path / "h")
    assert isinstance(model, HuginnLoop) and isinstance(model, LoopModel) and formats.detect(tmp_path / "h") == "huginn"
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    h0 = model.initial_state(model.encode(tokens), torch.Generator().manual_seed(1))
    torch.testing.assert_close(run_loop(model, tokens, 3, h0)[0], run_loop(ours, tokens, 3, h0)[0], rtol=0, atol=0)
    A, B = model.linear_part()
    W = model.transformer.adapter.weight
    assert torch.equal(A, W[:, :32]) and torch.equal(B, W[:, 32:]) and (model.mu_rec, model.mu_bwd) == (4, 2)
    result = rho_bound(model, 0.0)
    assert result.not_applicable is None and math.isfinite(result.measured)


def test_the_authors_modeling_file_beside_the_weights_never_runs(tmp_path):
    write(tmp_path / "h")
    marker = tmp_path / "ran"
    (tmp_path / "h" / "raven_modeling_minimal.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    model, _ = formats.load(tmp_path / "h")
    assert isinstance(model, HuginnLoop) and not marker.exists()


@pytest.mark.parametrize("field, value, says", [
    ("injection_type", "add", "injection_type: 'add' selects another injection"),
    ("test_time_noise", 0.5, "test_time_noise: 0.5 selects noise"),
    ("n_layers_extra", 2, "n_layers_extra: unknown huginn_raven field"),
    ("n_layers_in_coda", 2, "transformer.coda.1.*: missing key"),
    ("rope_base", 10000, "freqs_cis: .* is not the RoPE table of rope_base 10000"),
])
def test_bad_config_is_refused_naming_file_field_and_fix(tmp_path, field, value, says):
    write(tmp_path / "h")
    raw = json.loads((tmp_path / "h" / "config.json").read_text())
    raw[field] = value
    (tmp_path / "h" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=says):
        formats.load(tmp_path / "h")


# ---- the authors' implementation -------------------------------------------------------------------------

def reference_module():
    """recpre.raven_modeling_minimal from STABILITYLAB_HUGINN_REF, imported without recpre/__init__.py."""
    root = Path(REF)
    folder = root if root.name == "recpre" else root / "recpre"
    package = types.ModuleType("recpre")
    package.__path__ = [str(folder)]
    sys.modules.setdefault("recpre", package)
    modeling = importlib.import_module("recpre.raven_modeling_minimal")
    # transformers 5 reads tied weights as {target: source}; their file predates it
    modeling.RavenForCausalLM._tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    # and renames an output's past_key_values to cache, which their output class lacks
    modeling.CausalLMOutputRecurrentLatents = types.SimpleNamespace
    return modeling, importlib.import_module("recpre.raven_config_minimal")


@needs_ref
@pytest.mark.parametrize("depth", [1, 4, 8])  # μ_rec and 2·μ_rec; rounding grows past them (docs)
def test_logits_and_t_step_states_match_the_authors(tmp_path, depth):
    modeling, configuration = reference_module()
    torch.manual_seed(0)
    theirs = modeling.RavenForCausalLM(configuration.RavenConfig(**SMALL, qk_bias=True))
    randomize_(theirs, 1).eval()
    state = {k: v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "h").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "h" / "model.safetensors")
    raw = {k: v for k, v in theirs.config.to_dict().items() if k != "transformers_version"}
    (tmp_path / "h" / "config.json").write_text(json.dumps(raw))
    model, _ = formats.load(tmp_path / "h")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(depth))
    e = model.encode(tokens)
    h0 = model.initial_state(e, torch.Generator().manual_seed(2))
    logits, states = run_loop(model, tokens, depth, h0)
    with torch.no_grad():
        out = theirs(tokens, input_states=h0, num_steps=(depth, 0))
        x = h0
        for _ in range(depth):
            x, _, _ = theirs.iterate_one_step(e, x)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(states[-1], x, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.transformer.ln_f(states[-1]), out.latent_states, rtol=0, atol=1e-5)
