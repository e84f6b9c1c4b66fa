"""Ouro (formats/ouro.py): the published layout (config.json + sharded safetensors) loads into
the loop interface with no linear part; check and analyze run on it; the loop map composed T
times is the model's own T-step state; bad input is refused naming file, key and fix; nothing
beside the weights runs; and, when STABILITYLAB_OURO_REF points at a folder holding the
authors' ouro_rl/modeling/modeling_ouro.py and configuration_ouro.py (docs/formats.md says how
to fetch them), the same logits and T-step states as their OuroForCausalLM."""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stabilitylab import formats
from stabilitylab.analysis.bounds import rho_bound
from stabilitylab.analysis.spectra import loop_jacobian
from stabilitylab.cli import main
from stabilitylab.formats.files import CheckpointError
from stabilitylab.formats.ouro import OuroLoop, exit_distribution, model_config
from stabilitylab.model import LoopModel, run_loop

REF = os.environ.get("STABILITYLAB_OURO_REF")
needs_ref = pytest.mark.skipif(not REF, reason="STABILITYLAB_OURO_REF is unset: point it at a folder holding "
                                               "ouro_rl/modeling/modeling_ouro.py (docs/formats.md)")
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, total_ut_steps=4)
ROOT = Path(__file__).resolve().parents[1]


def config_json(**overrides) -> dict:
    """config.json as the authors' OuroConfig writes it (its fields, Ouro-1.4B's values where
    the size does not matter)."""
    f = {**SMALL, **overrides}
    return {"architectures": ["OuroForCausalLM"], "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                         "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"},
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "early_exit_threshold": 1.0,
            "head_dim": f["hidden_size"] // f["num_attention_heads"], "hidden_act": "silu",
            "hidden_size": f["hidden_size"], "initializer_range": 0.02, "intermediate_size": f["intermediate_size"],
            "layer_types": ["full_attention"] * f["num_hidden_layers"],
            "max_position_embeddings": f["max_position_embeddings"], "max_window_layers": 28, "model_type": "ouro",
            "num_attention_heads": f["num_attention_heads"], "num_hidden_layers": f["num_hidden_layers"],
            "num_key_value_heads": f["num_key_value_heads"], "rms_norm_eps": 1e-6, "rope_scaling": None,
            "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": f.get("tie_word_embeddings", False),
            "torch_dtype": "float32", "total_ut_steps": f["total_ut_steps"], "transformers_version": "4.55.0",
            "use_cache": True, "use_sliding_window": False, "vocab_size": f["vocab_size"]}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm weights near 1, the gate's bias too: zeros would hide a
    mapping error)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen) if p.ndim == 1 else
                    torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return module


def save_sharded(tensors: dict[str, torch.Tensor], path: Path, shards: int = 3) -> None:
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json, as save_pretrained shards."""
    keys = sorted(tensors)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: names[i * shards // len(keys)] for i, k in enumerate(keys)}
    for name in names:
        save_file({k: tensors[k].contiguous() for k in keys if weight_map[k] == name}, path / name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> OuroLoop:
    """A random Ouro written in the published layout (config.json + sharded safetensors)."""
    raw = config_json(**overrides)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    path.mkdir(parents=True, exist_ok=True)
    model = randomize_(OuroLoop(model_config(raw, path / "config.json")), seed).eval()
    save_sharded({k: v.clone().to(dtype) for k, v in model.state_dict().items()}, path)
    (path / "config.json").write_text(json.dumps(raw))
    return model


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ouro") / "ouro"
    write(path)
    return path


@pytest.fixture
def copy(published, tmp_path) -> Path:
    target = tmp_path / "ouro"
    target.mkdir()
    for file in published.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def tokens(batch: int = 2, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_published_layout_loads_into_the_loop_interface_with_no_linear_part(tmp_path):
    ours = write(tmp_path / "o")
    model, info = formats.load(tmp_path / "o")
    assert isinstance(model, OuroLoop) and isinstance(model, LoopModel) and formats.detect(tmp_path / "o") == "ouro"
    assert info.files[0] == "model.safetensors.index.json" and len(info.files) == 4
    x = tokens()
    torch.testing.assert_close(run_loop(model, x, 3)[0], run_loop(ours, x, 3)[0], rtol=0, atol=0)
    assert model.linear_part() is None and "no input injection" in model.no_linear_part
    assert (model.mu_rec, model.mu_bwd, model.state_dim, model.exit_threshold) == (4, 4, 32, 1.0)
    assert rho_bound(model, 0.0).not_applicable
    torch.testing.assert_close(model.initial_state(model.encode(x)), model.model.embed_tokens(x), rtol=0, atol=0)


@pytest.mark.parametrize("depth", [1, 4, 7])
def test_the_loop_map_composed_t_times_is_the_models_own_t_step_state(published, depth):
    model, _ = formats.load(published)
    x = tokens(seed=depth)
    logits, states = run_loop(model, x, depth)
    with torch.no_grad():
        their_logits, their_states, gates = model(x, depth)
    assert len(states) == depth + 1 and len(their_states) == depth
    for ours, theirs in zip(states[1:], their_states):  # math vs default attention kernel: rounding only
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, their_logits, rtol=0, atol=1e-5)
    with torch.no_grad():  # the readout has no second norm: h_t is normed inside F
        torch.testing.assert_close(logits, model.lm_head(states[-1]), rtol=0, atol=0)
        lam = torch.sigmoid(model.model.early_exit_gate(states[-1])).squeeze(-1)
    torch.testing.assert_close(gates[-1], lam, rtol=0, atol=1e-5)


def test_the_exit_distribution_is_the_first_exit_of_the_gates_and_sums_to_one():
    lambdas = [torch.tensor([[0.5]]), torch.tensor([[0.25]]), torch.tensor([[0.9]])]
    p = exit_distribution(lambdas)
    torch.testing.assert_close(p, torch.tensor([[[0.5, 0.125, 0.375]]]))
    gates = [torch.rand(2, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    torch.testing.assert_close(exit_distribution(gates).sum(-1), torch.ones(2, 5))


def test_the_loop_map_goes_through_torch_func(published):
    model, _ = formats.load(published)
    spectrum = loop_jacobian(model, tokens(1, 6), depth=2, position=-1, k=4, method="dense")
    assert spectrum.dim == SMALL["hidden_size"] and math.isfinite(spectrum.radius)


def test_check_and_analyze_verbs_run_on_the_directory(published, capsys, tmp_path):
    code = main(["check", str(published), "--bounds", str(ROOT / "checks" / "bounds.toml")])
    out = capsys.readouterr().out
    assert code in (0, 1) and "n/a" in out and "no input injection" in out
    code = main(["analyze", str(published), "--depth", "2", "--out", str(tmp_path / "x.json")])
    capsys.readouterr()
    assert code == 0 and (tmp_path / "x.json").is_file()
    assert "ouro" in (tmp_path / "x.json").read_text()


def test_a_tied_head_reads_the_embedding_and_a_differing_stored_head_is_refused(tmp_path):
    write(tmp_path / "o", tie_word_embeddings=True)
    model, _ = formats.load(tmp_path / "o")
    assert model.lm_head is None
    h = torch.randn(1, 3, SMALL["hidden_size"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.decode(h), h @ model.model.embed_tokens.weight.T, rtol=0, atol=0)
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    part = load_file(tmp_path / "o" / shard)
    save_file({**part, "lm_head.weight": torch.zeros(SMALL["vocab_size"], SMALL["hidden_size"])},
              tmp_path / "o" / shard)
    index["weight_map"]["lm_head.weight"] = shard
    (tmp_path / "o" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lm_head.weight: differs from model.embed_tokens.weight .* set "
                                              r"tie_word_embeddings to false"):
        formats.load(tmp_path / "o")


def test_bfloat16_weights_load_as_asked(tmp_path):
    write(tmp_path / "o", dtype=torch.bfloat16)
    model, _ = formats.load(tmp_path / "o", dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32
    assert torch.isfinite(run_loop(model, tokens(), 2)[0]).all()
    widened, _ = formats.load(tmp_path / "o")
    assert widened.lm_head.weight.dtype == torch.float32


def test_code_and_pickles_beside_the_weights_never_run(copy, tmp_path):
    marker = tmp_path / "ran"
    (copy / "modeling_ouro.py").write_text(f"open({str(marker)!r}, 'w').write('modeling')\n")
    (copy / "configuration_ouro.py").write_text(f"open({str(marker)!r}, 'w').write('config')\n")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (copy / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    model, _ = formats.load(copy)
    assert isinstance(model, OuroLoop) and not marker.exists()
    for file in copy.glob("*.safetensors*"):
        file.unlink()  # only the pickle left: refused, not read
    with pytest.raises(CheckpointError, match="pickled weights are not read"):
        formats.load(copy)
    assert not marker.exists()


@pytest.mark.parametrize("field, value, says", [
    ("total_ut_step", 4, r"config.json: total_ut_step: unknown ouro field .* remove it"),
    ("layer_types", ["full_attention", "sliding_attention"],
     r"config.json: layer_types\[1\]: 'sliding_attention': .* full causal attention only. every layer must be"),
    ("use_sliding_window", True, r"use_sliding_window: True selects sliding-window attention"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, r"rope_scaling: .* selects a scaled RoPE"),
    ("intermediate_size", 40, r"model.layers.0.mlp.down_proj.weight: has shape \(32, 48\), config.json needs "
                              r"\(32, 40\)"),
    ("num_hidden_layers", 3, r"model.layers.2.*: missing key"),
    ("torch_dtype", "bfloat16", r"is float32 but config.json's dtype is bfloat16. set dtype"),
])
def test_bad_config_is_refused_in_one_line_naming_file_key_and_fix(copy, field, value, says):
    raw = json.loads((copy / "config.json").read_text())
    raw[field] = value
    if field == "num_hidden_layers":
        raw["layer_types"] = ["full_attention"] * value
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=says) as err:
        formats.load(copy)
    assert "\n" not in str(err.value)


def test_a_missing_shard_a_wrong_dtype_and_an_unknown_model_type_are_refused(copy, capsys):
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    part = load_file(copy / first)
    key = sorted(part)[-1]
    save_file({**part, key: part[key].to(torch.bfloat16)}, copy / first)
    with pytest.raises(CheckpointError, match=rf"index.json: {key}: is torch.bfloat16 among weights of torch.float32. "
                                              r"re-save every"):
        formats.load(copy)
    save_file({**part, key: part[key].to(torch.int32)}, copy / first)
    with pytest.raises(CheckpointError, match=rf"{key}: is torch.int32"):
        formats.load(copy)
    (copy / first).unlink()
    with pytest.raises(CheckpointError, match=rf"index.json: .*: its shard {first} is missing. download {first}"):
        formats.load(copy)
    code = main(["check", str(copy), "--bounds", str(ROOT / "checks" / "bounds.toml")])
    assert code == 2 and f"its shard {first} is missing" in capsys.readouterr().err
    raw = json.loads((copy / "config.json").read_text())
    raw["model_type"] = "ouros"
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"model_type: 'ouros' is not a format .* ouro"):
        formats.load(copy)


# ---- the authors' implementation -------------------------------------------------------------------------

def reference_module():
    """ouro_rl.modeling.modeling_ouro from STABILITYLAB_OURO_REF, imported without the package's
    __init__.py (see shims_for_transformers_5)."""
    root = Path(REF)
    folder = root if root.name == "modeling" else root / "ouro_rl" / "modeling"
    package = types.ModuleType("ouro_modeling")
    package.__path__ = [str(folder)]
    sys.modules.setdefault("ouro_modeling", package)
    shims_for_transformers_5()
    return (importlib.import_module("ouro_modeling.modeling_ouro"),
            importlib.import_module("ouro_modeling.configuration_ouro"))


def shims_for_transformers_5() -> None:
    """Their file targets transformers 4.57; under 5.x it needs names that moved (filled in
    here, in the test only; none changes their arithmetic)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    # 5.x dropped "default" from the table their rotary embedding looks up: transformers' own
    # default RoPE (Qwen2's, rope_theta^(−2i/head_dim)) under that name
    ROPE_INIT_FUNCTIONS.setdefault("default", lambda config, device=None:
                                   Qwen2RotaryEmbedding.compute_default_rope_parameters(config))


def their_model(seed: int):
    """A random OuroForCausalLM on SMALL (their config takes pad_token_id, which 5.x no longer
    sets by default; eager attention, as our loop map's math kernel)."""
    modeling, configuration = reference_module()
    fields = {k: v for k, v in config_json().items() if k not in ("auto_map", "architectures", "model_type",
                                                                  "transformers_version", "torch_dtype")}
    config = configuration.OuroConfig(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(modeling.OuroForCausalLM(config), seed).eval()


@needs_ref
@pytest.mark.parametrize("depth", [1, 4, 8])  # below, at and past total_ut_steps (4)
def test_logits_and_t_step_states_match_the_authors(tmp_path, depth):
    theirs = their_model(depth)
    theirs.config.total_ut_steps = depth
    theirs.model.total_ut_steps = depth
    (tmp_path / "o").mkdir()
    save_sharded({k: v.clone() for k, v in theirs.state_dict().items()}, tmp_path / "o")
    (tmp_path / "o" / "config.json").write_text(json.dumps(config_json()))
    model, _ = formats.load(tmp_path / "o")
    x = tokens(2, 12, seed=depth)
    logits, states = run_loop(model, x, depth)
    # 5.x renamed create_causal_mask's input_embeds; their forward takes a prepared mask dict
    # (as generate passes it), so the causal mask is given, not built by them
    mask = torch.full((12, 12), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        # the last step's readout, named: their default (early_exit_threshold 1.0) exits at the
        # first step whose float32 cumulative exit probability rounds to ≥ 1.0, which at depth 8
        # on this model is step 7 for some tokens (docs/formats.md), not always the last
        out = theirs(x, attention_mask={"full_attention": mask}, use_cache=False, exit_at_step=depth - 1)
        _, their_states, their_gates = theirs.model(x, attention_mask={"full_attention": mask}, use_cache=False)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-5)
    assert len(their_states) == depth
    for ours, h in zip(states[1:], their_states):
        torch.testing.assert_close(ours, h, rtol=0, atol=1e-5)
    for h, gate in zip(states[1:], their_gates):
        torch.testing.assert_close(model.exit_probability(h), torch.sigmoid(gate.squeeze(-1)), rtol=0, atol=1e-6)
