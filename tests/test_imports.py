"""Released Parcae checkpoints (formats/parcae_lm.py): load, export, refuse, and match the authors' numbers.

The tests marked `needs_ref` build the authors' models; they run when STABILITYLAB_PARCAE_REF
points at the parcae_lm folder (its parent goes on sys.path) and skip otherwise.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stabilitylab import formats
from stabilitylab.config import ModelConfig
from stabilitylab.model import GPT, Depth, LoopedLM
from stabilitylab.formats.parcae_lm import (CheckpointError, from_parcae, gpt_split, is_parcae_checkpoint,
                                           load_parcae_checkpoint, model_config, save_parcae_checkpoint)

LISTING = Path(__file__).parent / "data" / "parcae_lm_state_dict.txt"
REF = os.environ.get("STABILITYLAB_PARCAE_REF")
needs_ref = pytest.mark.skipif(not REF, reason="STABILITYLAB_PARCAE_REF is unset: set it to the parcae_lm "
                                               "folder to compare with the authors' implementation")

# A small looped model whose value embeddings parcae_lm can express: tables and gates agree on (1, 3).
SMALL = dict(vocab_size=96, block_size=32, d_model=64, n_heads=2, n_prelude=1, n_core=2, n_coda=1,
             mean_recurrence=4, backprop_depth=2, value_embed_layers=(1, 3))


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (a fresh block is the identity, which would hide mapping errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def small_model(seed: int = 0, **overrides) -> LoopedLM:
    torch.manual_seed(seed)
    return randomize_(LoopedLM(ModelConfig(**{**SMALL, **overrides})), seed)


def meta_model(**overrides) -> LoopedLM:
    """A model without storage: enough for export's config checks, which come first."""
    with torch.device("meta"):
        return LoopedLM(ModelConfig(**{**SMALL, **overrides}))


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def edit_weights(path: Path, fn) -> None:
    tensors = torch.load(path / "model.pt", weights_only=True)
    fn(tensors)
    torch.save(tensors, path / "model.pt")


# ---- round trips ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> LoopedLM:
    return small_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved")
    save_parcae_checkpoint(model, path)
    return path


@pytest.fixture
def checkpoint(saved, tmp_path) -> Path:
    """A fresh copy of a valid checkpoint, for a test to break."""
    return shutil.copytree(saved, tmp_path / "checkpoint")


def test_load_export_load_is_exact(model, saved, tmp_path):
    first, info = load_parcae_checkpoint(saved)
    assert info.weights_file == "model.pt" and info.config_class == "ParcaeConfig"
    assert first.cfg == model.cfg
    assert_same_state(first, model)
    save_parcae_checkpoint(first, tmp_path, info=info)
    second, info2 = load_parcae_checkpoint(tmp_path)
    assert second.cfg == first.cfg and info2.config == info.config
    assert_same_state(second, first)


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_every_weights_format_holds_the_same_tensors(model, tmp_path, weights):
    save_parcae_checkpoint(model, tmp_path, weights=weights)
    loaded, info = load_parcae_checkpoint(tmp_path)
    assert info.weights_file == weights
    assert_same_state(loaded, model)


def test_loaded_model_computes_what_was_saved(tmp_path):
    model = small_model(injection="concat", n_core=1, mean_recurrence=3, backprop_depth=1, d_state=96,
                        n_state_heads=3, value_embed_layers=(0, 2), tie_embeddings=False).eval()
    save_parcae_checkpoint(model, tmp_path)
    loaded, _ = load_parcae_checkpoint(tmp_path)
    tokens = torch.randint(0, 96, (2, 16))
    h0 = torch.randn(2, 16, 96)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, depth=3, h0=h0).logits, model(tokens, depth=3, h0=h0).logits)


def test_gpt_config_loads_as_a_gpt_with_layers_split_into_thirds(tmp_path):
    P, C, D = gpt_split(5)
    assert (P, C, D) == (1, 3, 1) and gpt_split(6) == (2, 2, 2) and gpt_split(1) == (0, 1, 0)
    torch.manual_seed(0)
    model = randomize_(GPT(ModelConfig(**{**SMALL, "n_prelude": P, "n_core": C, "n_coda": D,
                                          "value_embed_layers": (0, 2, 4), "looped": False})), 1)
    save_parcae_checkpoint(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["_class_name"] == "GPTConfig" and raw["n_layer"] == 5
    assert "transformer.h.4.attn.c_q.weight" in torch.load(tmp_path / "model.pt", weights_only=True)
    loaded, info = load_parcae_checkpoint(tmp_path)
    assert isinstance(loaded, GPT) and info.config_class == "GPTConfig"
    assert_same_state(loaded, model)


def test_dead_value_embedding_parameters_are_kept_aside_and_written_back(tmp_path):
    # 1/1/1 layers, μ_bwd 4: tables at layers {0, 2} (L = 3) but gates at {1, 2} (n_layer = 4):
    # only layer 2 uses one; table 0 and the core's gate are dead.
    model = small_model(n_core=1, mean_recurrence=4, backprop_depth=4, value_embed_layers=(2,))
    save_parcae_checkpoint(model, tmp_path / "a")
    dead = {"value_embeds.0.weight": torch.randn(96, 64), "transformer.core_block.0.attn.ve_gate.weight":
            torch.randn(2, 32)}
    edit_weights(tmp_path / "a", lambda t: t.update(dead))
    loaded, info = load_parcae_checkpoint(tmp_path / "a")
    assert loaded.cfg.ve_layers == (2,) and set(loaded.value_embeds) == {"2"}
    assert loaded.core[0].attn.ve_gate is None
    assert info.unused.keys() == dead.keys()
    save_parcae_checkpoint(loaded, tmp_path / "b", info=info)
    written = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    for key, value in dead.items():
        assert torch.equal(written[key], value), key


def test_export_refuses_value_embeddings_parcae_lm_would_not_apply(tmp_path):
    # The lab default (1/1/1, μ_rec 4, μ_bwd 2) puts them at (0, 2); parcae_lm would gate only (1, 2).
    with pytest.raises(CheckpointError, match=r"value_embed_layers.*applies them exactly at \[2\]"):
        with torch.device("meta"):
            model = LoopedLM(ModelConfig())
        save_parcae_checkpoint(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("overrides, field", [
    (dict(injection="parcae-zoh"), "injection"),
    (dict(injection="stable-dense"), "injection"),
    (dict(init_state="seeded"), "init_state"),
    (dict(depth_scheme="poisson-lognormal"), "depth_scheme"),
    (dict(depth_granularity="batch"), "depth_granularity"),
    (dict(backprop_depth=5), "backprop_depth: 5 > mean_recurrence 4"),
    (dict(norm_position="post"), "norm_position"),
    (dict(init_std=0.02), "init_std"),
])
def test_export_refuses_what_parcae_lm_cannot_express(tmp_path, overrides, field):
    with pytest.raises(CheckpointError, match=field):
        save_parcae_checkpoint(meta_model(**overrides), tmp_path)


def test_export_refuses_to_leave_a_stale_weights_file_beside_the_new_one(model, tmp_path):
    save_parcae_checkpoint(model, tmp_path, weights="model.safetensors")
    with pytest.raises(CheckpointError, match="already holds model.safetensors"):
        save_parcae_checkpoint(model, tmp_path, weights="model.pt")


# ---- the released format ------------------------------------------------------------------------

def read_listing() -> tuple[dict[str, tuple[int, ...]], dict]:
    """Key shapes and config.json of the small model in tests/data/parcae_lm_state_dict.txt."""
    shapes, raw = {}, {}
    for line in LISTING.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if " = " in line:
            name, value = line.split(" = ", 1)
            raw[name] = json.loads(value)
        else:
            key, shape = line.split(" ", 1)
            shapes[key] = tuple(json.loads("[" + shape.rsplit(" ", 1)[0].strip("()").rstrip(",") + "]"))
    return shapes, raw


def test_the_documented_state_dict_loads_key_for_key(tmp_path):
    shapes, raw = read_listing()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    tensors = {k: torch.randn(s) for k, s in shapes.items() if k != "freqs_cis"}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    torch.save(tensors, tmp_path / "model.pt")
    model, info = load_parcae_checkpoint(tmp_path)
    assert info.unused == {}
    assert model.cfg.ve_layers == (1, 3, 5)
    assert torch.equal(model.core[1].attn.qkv.weight, torch.cat(
        [tensors[f"transformer.core_block.1.attn.c_{p}.weight"] for p in "qkv"]))
    assert torch.equal(model.readout.weight, tensors["transformer.C.weight"])
    save_parcae_checkpoint(model, tmp_path / "export", info=info)  # and we write that format, key for key
    written = torch.load(tmp_path / "export" / "model.pt", weights_only=True)
    assert {k: tuple(t.shape) for k, t in written.items()} == shapes
    assert json.loads((tmp_path / "export" / "config.json").read_text()) == raw


def test_released_140m_config_maps_onto_our_preset():
    _, raw = read_listing()
    raw.update(name="parcae-small-140m", block_size=2048, n_embd=768, intermediate_size=3072,
               num_attention_heads=6, num_key_value_heads=6, vocab_size=32768, padded_vocab_size=32768,
               recurrent_embedding_dimension=768, recurrent_intermediation_embedding_dimension=3072,
               mean_recurrence=8, mean_backprop_depth=4)
    cfg, kind = model_config(raw, Path("config.json"))
    assert kind == "ParcaeConfig"
    assert cfg == ModelConfig.preset("parcae-140m", value_embed_layers=(1, 3, 5))


# ---- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, says", [
    ("injection_type", "gated", "injection_type: 'gated' is not supported"),
    ("bias", True, "bias: True adds a bias to every linear layer"),
    ("qk_bias", True, "qk_bias"),
    ("clip_qkv", 8.0, "clip_qkv: 8.0 clamps q, k and v"),
    ("logit_softcap", 15.0, "logit_softcap"),
    ("use_abacus", True, "use_abacus"),
    ("randomize_positions_from", 4096, "randomize_positions_from"),
    ("norm_class_name", "LayerNorm", "norm_class_name"),
    ("mlp_class_name", "GatedMLP", "mlp_class_name"),
    ("block_class_name", "TransformerPostNormBlock", "block_class_name"),
    ("nonlin_name", "Tanh", "nonlin_name"),
    ("mup_model_scaling_factor", 2, "mup_model_scaling_factor"),
    ("init_strategy", "takase", "init_strategy: 'takase' is not supported"),
    ("state_init", "unit", "state_init"),
    ("sampling_scheme", "poisson-truncated-full-curriculum-1000", "sampling_scheme"),
    ("recurrent_iteration_method", "per-batch", "per-batch poisson-truncated-full"),
    ("mean_backprop_depth", 6, "mean_backprop_depth: 6 > mean_recurrence"),
    ("rope_settings", {"use_rope": True, "rope_condense_ratio": 1, "rope_base": "50000"}, "malformed"),
    ("use_fused_head", "hhe", "use_fused_head"),
    ("rope_settings", {"use_rope": True, "rope_condense_ratio": 2, "rope_base": 50000}, "rope_condense_ratio"),
    ("n_embd", "64", "n_embd: '64' has the wrong type"),
    ("n_layers_in_recurrent_block", 0, "n_layers_in_recurrent_block: a looped model needs at least one core"),
    ("num_attention_heads", 3, "num_attention_heads: d_model = 64 is not divisible"),
    ("new_field", 1, "new_field: unknown ParcaeConfig field"),
])
def test_config_values_that_change_the_forward_are_refused(checkpoint, field, value, says):
    edit_config(checkpoint, **{field: value})
    with pytest.raises(CheckpointError, match="config.json") as err:
        load_parcae_checkpoint(checkpoint)
    assert says in str(err.value)


def test_a_missing_class_name_is_refused_with_the_likely_fix(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    del raw["_class_name"]
    (checkpoint / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match='add "_class_name": "ParcaeConfig"'):
        load_parcae_checkpoint(checkpoint)


def test_a_missing_config_field_is_refused(checkpoint):
    raw = json.loads((checkpoint / "config.json").read_text())
    del raw["qk_norm"]
    (checkpoint / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="qk_norm: missing"):
        load_parcae_checkpoint(checkpoint)


@pytest.mark.parametrize("edit, says", [
    (lambda t: t.update({"transformer.extra.weight": torch.zeros(1)}), "transformer.extra.weight: unexpected"),
    (lambda t: t.pop("transformer.core_block.1.mlp.fc.weight"), "transformer.core_block.1.mlp.fc.weight: missing"),
    (lambda t: t.update({"transformer.C.weight": torch.zeros(64, 32)}),
     "transformer.C.weight: has shape (64, 32), the config needs (64, 64)"),
    (lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}), "lm_head.weight: differs"),
    (lambda t: t.update({"freqs_cis": t["freqs_cis"] * 2}), "freqs_cis"),
])
def test_weights_that_do_not_match_the_config_are_refused(checkpoint, edit, says):
    edit_weights(checkpoint, edit)
    with pytest.raises(CheckpointError, match="model.pt") as err:
        load_parcae_checkpoint(checkpoint)
    assert says in str(err.value)


def test_rope_settings_must_match_the_stored_rope_table(checkpoint):
    edit_config(checkpoint, rope_settings={"use_rope": True, "rope_condense_ratio": 1, "rope_base": 10000})
    with pytest.raises(CheckpointError, match="freqs_cis.*rope_base.*10000"):
        load_parcae_checkpoint(checkpoint)


class _Payload:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_that_would_run_code_is_refused_unrun(checkpoint, writer):
    marker = checkpoint / "marker"
    state = {"transformer.wte.weight": torch.zeros(2), "evil": _Payload(marker)}
    if writer == "torch.save":
        torch.save(state, checkpoint / "model.pt")
    else:
        (checkpoint / "model.pt").write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(CheckpointError, match="model.pt: weights: cannot be read safely"):
        load_parcae_checkpoint(checkpoint)
    assert not marker.exists()


def test_a_parcae_lm_directory_is_recognised_by_its_config(checkpoint, tmp_path_factory):
    assert is_parcae_checkpoint(checkpoint)
    assert not is_parcae_checkpoint(checkpoint / "config.json")
    other = tmp_path_factory.mktemp("other")
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_parcae_checkpoint(other)
    (checkpoint / "model.pt").unlink()  # still routed to the loader, which says what is missing
    assert is_parcae_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="weights: none of model.safetensors, pytorch_model.bin, model.pt"):
        load_parcae_checkpoint(checkpoint)


def test_the_registry_detects_parcae_lm_and_loads_it_like_the_format_module(model, checkpoint, tmp_path):
    assert formats.detect(checkpoint) == "parcae_lm"
    loaded, info = formats.load(checkpoint)
    assert_same_state(loaded, model)
    assert info.config_class == "ParcaeConfig"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert formats.detect(other) is None
    with pytest.raises(CheckpointError, match=r"config.json: model_type: 'llama' is not a format .* known "
                                              r"model_type values: .*hrm_text"):
        formats.load(other)
    with pytest.raises(CheckpointError, match="format: 'llama' is unknown"):
        formats.load(checkpoint, format="llama")


def test_the_old_import_path_still_works_and_warns_that_it_is_deprecated(monkeypatch):
    monkeypatch.delitem(sys.modules, "stabilitylab.model.imports", raising=False)
    with pytest.deprecated_call(match="stabilitylab.formats.parcae_lm"):
        old = importlib.import_module("stabilitylab.model.imports")
    assert old.load_parcae_checkpoint is load_parcae_checkpoint and old.CheckpointError is CheckpointError


# ---- numerical equivalence with the authors' implementation ---------------------------------------

def parcae_lm():
    sys.path.insert(0, str(Path(REF).resolve().parent))
    import parcae_lm as module
    return module


# Small configurations of the authors' models: (class, fields over the released 140M recipe).
TINY = dict(block_size=32, vocab_size=96, padding_multiple=32, n_embd=64, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=256, recurrent_embedding_dimension=64,
            recurrent_intermediation_embedding_dimension=256, n_layers_in_prelude=1,
            n_layers_in_recurrent_block=2, n_layers_in_coda=1, mean_recurrence=4, mean_backprop_depth=2)
REF_CONFIGS = {
    "parcae-1-2-1": ("ParcaeConfig", {}),
    # wide state; tables at (0, 2, 4), gates at (1, 3): every value embedding is dead
    "parcae-2-1-2-wide-state-dead-ve": ("ParcaeConfig", dict(
        n_layers_in_prelude=2, n_layers_in_recurrent_block=1, n_layers_in_coda=2, mean_recurrence=3,
        recurrent_embedding_dimension=96, recurrent_num_attention_heads=3,
        recurrent_intermediation_embedding_dimension=192, recurrent_iteration_method="per-token")),
    # wide state with value embeddings in prelude and coda (0, 2)
    "parcae-1-1-1-wide-state": ("ParcaeConfig", dict(
        n_layers_in_recurrent_block=1, mean_recurrence=3, mean_backprop_depth=1,
        recurrent_embedding_dimension=96, recurrent_num_attention_heads=3,
        recurrent_intermediation_embedding_dimension=384)),
    # μ_bwd 4: table 0 and the core gate are dead, layer 2 uses its embedding
    "parcae-1-1-1-dead-ve": ("ParcaeConfig", dict(n_layers_in_recurrent_block=1, mean_backprop_depth=4)),
    "linear-gqa": ("ParcaeConfig", dict(
        injection_type="linear", n_layers_in_recurrent_block=1, mean_recurrence=3, mean_backprop_depth=1,
        num_attention_heads=4, num_key_value_heads=2)),
    "add-untied-gelu": ("ParcaeConfig", dict(
        injection_type="add", prelude_norm=False, tie_embeddings=False, nonlin_name="GELU", qk_norm=False,
        state_init="zero", rope_settings={"use_rope": True, "rope_condense_ratio": 1, "rope_base": 10000},
        sampling_scheme="fixed", mean_recurrence=3)),
    # parcae_lm builds its fused head only with triton; without one, a tied GPT's lm_head is unused
    "gpt-4-tied": ("GPTConfig", dict(n_layer=4, use_fused_head=None)),
    "gpt-3-untied-gqa": ("GPTConfig", dict(n_layer=3, use_fused_head=None, tie_embeddings=False,
                                          num_attention_heads=4, num_key_value_heads=2)),
}


def build_reference(kind: str, fields: dict, seed: int):
    lm = parcae_lm()
    from parcae_lm.models.registry import name_to_config
    recipe = dict(name_to_config["parcae-small-140m"])
    recipe.pop("architecture_class_name")
    recipe.update(TINY, skip_initialization=True)  # randomize_ sets every parameter
    if kind == "GPTConfig":
        for name in [k for k in recipe if k not in lm.GPTConfig.__dataclass_fields__]:
            del recipe[name]
    torch.manual_seed(seed)
    config = (lm.ParcaeConfig if kind == "ParcaeConfig" else lm.GPTConfig)(**{**recipe, **fields})
    return randomize_(config.construct_model(), seed)


def reference_from_directory(path: Path):
    """parcae_lm's own loading of our export: config class from config.json, strict load."""
    lm = parcae_lm()
    raw = json.loads((path / "config.json").read_text())
    config = (lm.ParcaeConfig if raw.pop("_class_name") == "ParcaeConfig" else lm.GPTConfig)(**raw)
    model = config.construct_model()
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True), strict=True)
    return model


def reference_forward(ref, tokens, h0=None, steps=None, labels=None):
    """Their forward from a fixed initial state, at a fixed depth (num_steps_pair = [n, k]) or,
    with steps None, at the depths their sampler draws."""
    kwargs = {"num_steps_pair": torch.tensor(steps)} if steps is not None else {}
    if h0 is not None:
        ref.initialize_state = lambda e: h0
    return ref(tokens, labels=labels, return_logits=labels is None, **kwargs)


def compare_training_step(ref, model, info, tokens, labels, h0, their_steps, our_depth) -> tuple[float, float]:
    """One backward in each model; (|Δloss|, max |Δgrad|) over every mapped parameter."""
    ref.train()
    model.train()
    ref.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    their_loss = reference_forward(ref, tokens, h0, their_steps, labels)["loss"]
    our_loss = model(tokens, targets=labels, depth=our_depth, h0=h0).loss
    their_loss.backward()
    our_loss.backward()
    their_grads = {k: p.grad for k, p in ref.named_parameters()}
    assert all(their_grads[k] is None for k in info.unused), "a parameter we call unused got a gradient"
    expected = from_parcae(their_grads, info.key_map)
    grad_diff = 0.0
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[key], rtol=1e-4, atol=1e-5, msg=key)
        grad_diff = max(grad_diff, (p.grad - expected[key]).abs().max().item())
    loss_diff = abs(their_loss.item() - our_loss.item())
    assert loss_diff < 1e-5
    return loss_diff, grad_diff


@needs_ref
@pytest.mark.parametrize("name", list(REF_CONFIGS))
def test_logits_loss_and_gradients_match_parcae_lm(tmp_path, name):
    kind, fields = REF_CONFIGS[name]
    ref = build_reference(kind, fields, seed=len(name))
    parcae_lm().save_pretrained(ref, tmp_path / "theirs")
    model, info = load_parcae_checkpoint(tmp_path / "theirs")
    looped = kind == "ParcaeConfig"
    assert model.cfg.looped == looped
    if looped:  # "like-init" draws h_0 with the same std as ours
        assert math.isclose(ref.config.init.get_std("embedding"), model.cfg.std)

    gen = torch.Generator().manual_seed(1)
    B, T = 2, 24
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T), generator=gen)
    labels = torch.randint(0, model.cfg.vocab_size, (B, T), generator=gen)
    h0 = torch.randn(B, T, model.cfg.state_dim, generator=gen) * 0.1 if looped else None
    depth = model.cfg.mean_recurrence

    ref.eval()
    with torch.no_grad():
        theirs = reference_forward(ref, tokens, h0, [depth, 0] if looped else None)["logits"]
        ours = model(tokens, depth=Depth(depth, 0), h0=h0).logits
    logit_diff = (theirs - ours).abs().max().item()
    assert logit_diff < 1e-5, logit_diff

    steps = [
        compare_training_step(ref, model, info, tokens, labels, h0, [2, 2] if looped else None, Depth(2, 2))]
    if looped:  # their own per-sequence / per-token draw (seeded by ref.step), replayed as our Depth tensors
        ref.step = 7
        per_token = model.cfg.depth_granularity == "token"
        n, k = ref._sample_batch_depths(B, T if per_token else None)
        assert n.unique().numel() > 1 or k.unique().numel() > 1 or model.cfg.depth_scheme == "fixed"
        steps.append(compare_training_step(ref, model, info, tokens, labels, h0, None, Depth(n, k)))
    print(f"\n{name}: max |Δlogit| = {logit_diff:.2e}, |Δloss| ≤ {max(s[0] for s in steps):.2e}, "
          f"max |Δgrad| = {max(s[1] for s in steps):.2e}")

    # and back: our export is their checkpoint, tensor for tensor
    save_parcae_checkpoint(model, tmp_path / "ours", info=info)
    again = reference_from_directory(tmp_path / "ours").state_dict()
    original = ref.state_dict()
    assert again.keys() == original.keys()
    for key, value in again.items():
        assert torch.equal(value, original[key]) or key == "freqs_cis", key
    torch.testing.assert_close(again["freqs_cis"], original["freqs_cis"], rtol=0, atol=1e-6)


@needs_ref
def test_a_lab_model_exports_to_a_parcae_lm_model_with_the_same_logits(tmp_path):
    # wide state, value embeddings in prelude and coda (μ_bwd 1: gates at layer ids 0 and 4)
    model = small_model(seed=3, n_core=1, mean_recurrence=3, backprop_depth=1, d_state=96, n_state_heads=3,
                        value_embed_layers=(0, 2)).eval()
    save_parcae_checkpoint(model, tmp_path)
    ref = reference_from_directory(tmp_path).eval()
    tokens = torch.randint(0, 96, (2, 20))
    h0 = torch.randn(2, 20, 96) * 0.1
    with torch.no_grad():
        theirs = reference_forward(ref, tokens, h0, [3, 0])["logits"]
        ours = model(tokens, depth=Depth(3, 0), h0=h0).logits
    assert (theirs - ours).abs().max().item() < 1e-5


def test_export_refuses_core_value_embeddings_parcae_lm_would_size_differently(tmp_path):
    model = meta_model(d_state=96, n_state_heads=3)  # core layer 1 has one, 96 wide; parcae_lm's would be 64
    with pytest.raises(CheckpointError, match=r"core layer\(s\) \[1\].*64 wide"):
        save_parcae_checkpoint(model, tmp_path)


# ---- the 140M model on this machine's CPU ---------------------------------------------------------

def measure_140m(directory: str) -> dict:
    """Export a random parcae-140m to parcae_lm format, load it, time a depth-8 forward on 1×512."""
    import resource
    import time

    torch.manual_seed(0)
    cfg = ModelConfig.preset("parcae-140m", value_embed_layers=(1, 3, 5))
    start = time.perf_counter()
    save_parcae_checkpoint(LoopedLM(cfg), directory)
    built = time.perf_counter()
    model, _ = load_parcae_checkpoint(directory)
    loaded = time.perf_counter()
    tokens = torch.randint(0, cfg.vocab_size, (1, 512))
    with torch.no_grad():
        model(tokens, depth=8)
    done = time.perf_counter()
    return {"parameters": model.num_parameters(), "build_and_export_s": built - start,
            "load_s": loaded - built, "forward_depth8_1x512_s": done - loaded,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@pytest.mark.slow
def test_the_140m_model_loads_and_runs_on_cpu_within_memory(tmp_path):
    out = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, check=True)
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    print("\n140M:", numbers)
    assert numbers["peak_rss_gib"] < 8, numbers


if __name__ == "__main__":
    print(json.dumps(measure_140m(sys.argv[1])))
