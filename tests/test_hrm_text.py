"""HRM-Text (formats/hrm_text.py) against transformers' own HrmTextForCausalLM: the same
logits at several depths, the same states after T loop steps, the published layout read
without running anything in it, and bad input refused with the file, key and fix."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from transformers import HrmTextConfig, HrmTextForCausalLM

from stabilitylab import formats
from stabilitylab.analysis.bounds import Bounds, CheckSettings
from stabilitylab.analysis.spectra import loop_jacobian
from stabilitylab.analyze import analyze
from stabilitylab.cli import main
from stabilitylab.formats.files import CheckpointError
from stabilitylab.formats.hrm_text import HrmTextLoop
from stabilitylab.model import LoopModel, run_loop
from stabilitylab.targets import TargetError, check_target, load_target

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             head_dim=16, max_position_embeddings=32, H_cycles=2, L_cycles=2)


def reference(seed: int = 0, **overrides) -> HrmTextForCausalLM:
    """A random HRM-Text, every parameter random (z_L_init too: zeros would hide a mapping error)."""
    torch.manual_seed(seed)
    model = HrmTextForCausalLM(HrmTextConfig(**{**SMALL, **overrides}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model.eval()


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A small random checkpoint in the published layout, sharded with an index."""
    path = tmp_path_factory.mktemp("hrm")
    reference().save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture
def copy(published, tmp_path) -> Path:
    target = tmp_path / "hrm"
    target.mkdir()
    for file in published.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def their_run(path: Path, tokens: torch.Tensor, depth: int,
              token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, z_H, z_L) of transformers' own model loaded from `path`, run for `depth` H-cycles
    (prefix-LM mask when token_type_ids is given)."""
    ref = HrmTextForCausalLM.from_pretrained(path).eval()
    ref.config.H_cycles = depth
    z_L = []
    hook = ref.model.L_module.register_forward_hook(lambda module, args, out: z_L.append(out))
    with torch.no_grad():
        out = ref(tokens, token_type_ids=token_type_ids, use_cache=False)
        z_H = ref.model(tokens, token_type_ids=token_type_ids, use_cache=False).last_hidden_state
    hook.remove()
    return out.logits, z_H, z_L[-1]


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_logits_and_states_after_t_steps_match_transformers(published, depth):
    model, info = formats.load(published)
    assert isinstance(model, HrmTextLoop) and isinstance(model, LoopModel) and formats.detect(published) == "hrm_text"
    assert info.files[0] == "model.safetensors.index.json" and len(info.files) > 2
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(depth))
    logits, states = run_loop(model, tokens, depth)
    their_logits, z_H, z_L = their_run(published, tokens, depth)
    d = SMALL["hidden_size"]
    torch.testing.assert_close(logits, their_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(states[-1][..., :d], z_H, rtol=0, atol=1e-5)
    torch.testing.assert_close(states[-1][..., d:], z_L, rtol=0, atol=1e-5)
    assert model.mu_rec == SMALL["H_cycles"] and model.linear_part() is None


# row 0: a 5-token instruction then the response; row 1: instruction marks not contiguous (transformers
# makes ALL positions of type 1 one bidirectional block, wherever they are)
TOKEN_TYPES = torch.tensor([[1] * 5 + [0] * 7, [1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0]])


def our_run(model: HrmTextLoop, tokens: torch.Tensor, depth: int, token_type_ids: torch.Tensor) -> tuple:
    """(logits, h_depth) through the loop interface with token types passed to loop_map."""
    with torch.no_grad():
        e = model.encode(tokens)
        F = model.loop_map(e, tokens, token_type_ids=token_type_ids)
        h = model.initial_state(e)
        for _ in range(depth):
            h = F(h)
        return model.decode(h, tokens), h


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_prefix_lm_mask_matches_transformers_token_type_ids(published, depth):
    model, _ = formats.load(published)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(10 + depth))
    logits, h = our_run(model, tokens, depth, TOKEN_TYPES)
    their_logits, z_H, z_L = their_run(published, tokens, depth, TOKEN_TYPES)
    d = SMALL["hidden_size"]
    torch.testing.assert_close(logits, their_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(h[..., :d], z_H, rtol=0, atol=1e-5)
    torch.testing.assert_close(h[..., d:], z_L, rtol=0, atol=1e-5)
    causal, _ = run_loop(model, tokens, depth)
    assert (logits - causal).abs().max() > 1e-3  # the mask matters: not the causal answer


def test_prefix_len_is_the_contiguous_instruction_for_every_analysis(published):
    """prefix_len = p is token types 1 on positions < p, reaching run_loop (and so every analysis);
    an instruction token is seen by the instruction positions before it, a response token by none."""
    model, _ = formats.load(published)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    types = (torch.arange(12) < 5).long().expand(2, 12)
    explicit, _ = our_run(model, tokens, 2, types)
    model.prefix_len = 5
    logits, _ = run_loop(model, tokens, 2)
    torch.testing.assert_close(logits, explicit, rtol=0, atol=0)
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % SMALL["vocab_size"]  # the last instruction token
    seen, _ = run_loop(model, changed, 2)
    assert (seen[:, :4] - logits[:, :4]).abs().amax() > 1e-4
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % SMALL["vocab_size"]  # a response token: causal
    unseen, _ = run_loop(model, changed, 2)
    torch.testing.assert_close(unseen[:, :7], logits[:, :7], rtol=0, atol=0)
    spectrum = loop_jacobian(model, tokens[:1, :6], depth=2, position=0, k=4, method="dense")
    assert math.isfinite(spectrum.radius)


def test_token_types_on_a_causal_only_checkpoint_are_refused(copy):
    edit_config(copy, prefix_lm=False)
    model, _ = formats.load(copy)
    tokens = torch.zeros(2, 12, dtype=torch.long)
    with pytest.raises(ValueError, match="prefix_lm is false"):
        model.loop_map(model.encode(tokens), tokens, token_type_ids=TOKEN_TYPES)
    with pytest.raises(ValueError, match=r"token_type_ids must be \(batch, seq_len\)"):
        model.lm.config.prefix_lm = True
        model.loop_map(model.encode(tokens), tokens, token_type_ids=TOKEN_TYPES[:, :5])


def test_the_loop_map_goes_through_torch_func(published):
    model, _ = formats.load(published)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    spectrum = loop_jacobian(model, tokens, depth=2, position=-1, k=4, method="dense")
    assert spectrum.dim == 2 * SMALL["hidden_size"] and math.isfinite(spectrum.radius)


def test_check_and_analyze_run_on_the_directory_with_linear_bounds_not_applicable(published):
    report = check_target(published, Bounds(rho_margin=0.0, max_input_norm=1.0, max_readout_norm=1.0,
                                            max_state_growth=100.0, max_jacobian_radius=100.0),
                          CheckSettings(batch_size=1, seq_len=8))
    assert [r.name for r in report.results if r.not_applicable] == ["rho_margin", "max_input_norm",
                                                                      "max_readout_norm"]
    assert "no input injection" in report.result("rho_margin").not_applicable
    assert math.isfinite(report.result("max_state_growth").measured)
    target = load_target(published)
    assert target.kind == "hrm_text"
    result = analyze(target, depth=2, batch_size=1, seq_len=6)
    assert result.error is None and result.jacobian.dim == 2 * SMALL["hidden_size"]


def test_bfloat16_loads_as_asked(published):
    model, _ = formats.load(published, dtype=torch.bfloat16)
    assert model.lm.lm_head.weight.dtype == torch.bfloat16
    assert model.lm.model.rotary_emb.inv_freq.dtype == torch.float32


def test_code_and_pickles_beside_the_weights_never_run(copy, tmp_path):
    marker = tmp_path / "ran"
    (copy / "modeling_hrm_text.py").write_text(f"open({str(marker)!r}, 'w').write('modeling')\n")
    (copy / "configuration_hrm_text.py").write_text(f"open({str(marker)!r}, 'w').write('config')\n")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (copy / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    model, _ = formats.load(copy)
    assert isinstance(model, HrmTextLoop) and not marker.exists()
    for file in copy.glob("*.safetensors*"):
        file.unlink()  # only the pickle left: refused, not read
    with pytest.raises(CheckpointError, match="pickled weights are not read"):
        formats.load(copy)
    assert not marker.exists()


def edit_config(path: Path, **changes) -> None:
    """Change config.json fields in place."""
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def test_bad_input_is_refused_in_one_line_naming_file_key_and_fix(copy):
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    raw = json.loads((copy / "config.json").read_text())
    edit_config(copy, auto_map={"AutoModelForCausalLM": "modeling_hrm_text.Evil"})
    with pytest.raises(CheckpointError, match=r"config.json: auto_map: unknown HrmTextConfig field .* never runs "
                                              r"code from a checkpoint"):
        formats.load(copy)
    raw["hidden_sizes"] = 3
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config.json: hidden_sizes: unknown HrmTextConfig field"):
        formats.load(copy)
    del raw["hidden_sizes"]
    raw["dtype"] = "bfloat16"
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: .*: is float32 but config.json's "
                                              r"dtype is bfloat16. set dtype"):
        formats.load(copy)
    raw["dtype"], raw["intermediate_size"] = "float32", 48
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.down_proj.weight: has shape \(32, 64\), config.json "
                                              r"needs \(32, 48\)"):
        formats.load(copy)
    raw["intermediate_size"] = 64
    (copy / "config.json").write_text(json.dumps(raw))
    shard = sorted(set(index["weight_map"].values()))[-1]
    (copy / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"index.json: .*: its shard {shard} is missing. download {shard}"):
        formats.load(copy)
    raw["model_type"] = "hrm_texts"
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"model_type: 'hrm_texts' is not a format .* hrm_text"):
        formats.load(copy)


def test_the_check_verb_runs_on_the_directory_and_refuses_a_wrong_format_with_exit_2(published, capsys, tmp_path):
    bounds = tmp_path / "bounds.toml"
    bounds.write_text("[bounds]\nrho_margin = 0.0\nmax_state_growth = 100.0\n[settings]\nbatch_size = 1\n"
                      "seq_len = 8\n")
    code = main(["check", str(published), "--bounds", str(bounds), "--format", "hrm_text"])
    out = capsys.readouterr().out
    assert code == 0 and "n/a" in out and "max_state_growth" in out
    code = main(["check", str(published), "--bounds", str(bounds), "--format", "parcae_lm"])
    assert code == 2 and "_class_name" in capsys.readouterr().err


def test_prefix_len_flag_reaches_the_model_in_every_verb_and_is_refused_where_it_means_nothing(
        published, copy, capsys, tmp_path):
    """--prefix-len N sets the instruction block of the loaded model for check, analyze,
    trace and exit (their numbers move from the causal ones); it is a one-line exit 2 for
    a negative N, for a model without a prefix-LM mask and on a prefix_lm = false checkpoint."""
    assert load_target(published).model.prefix_len == 0
    assert load_target(published, prefix_len=4).model.prefix_len == 4
    for verb in (["trace", str(published), "--depth", "2", "--batch", "1"],
                 ["exit", str(published), "--max-depth", "3", "--batch", "1", "--seq-len", "8"]):
        outputs = []
        for extra in ([], ["--prefix-len", "6"]):
            assert main([*verb, *extra]) == 0, capsys.readouterr().err
            outputs.append(capsys.readouterr().out)
        assert outputs[0] != outputs[1], verb[0]  # bidirectional attention in the first 6 positions
    bounds = tmp_path / "bounds.toml"
    bounds.write_text("[bounds]\nmax_state_growth = 100.0\n[settings]\nbatch_size = 1\nseq_len = 8\n")
    assert main(["check", str(published), "--bounds", str(bounds), "--prefix-len", "6"]) == 0
    capsys.readouterr()
    assert main(["check", str(published), "--bounds", str(bounds), "--prefix-len", "-1"]) == 2
    assert "--prefix-len" in capsys.readouterr().err
    with pytest.raises(TargetError, match="prefix-LM"):  # a run or a checkpoint file: LoopedLM has no such mask
        load_target(tmp_path / "some-run", prefix_len=2)
    edit_config(copy, prefix_lm=False)
    assert main(["analyze", str(copy), "--prefix-len", "3"]) == 2
    err = capsys.readouterr().err
    assert "prefix_lm is false" in err and "config.json" in err and len(err.strip().splitlines()) == 1
