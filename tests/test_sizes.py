"""The closed-form parameter count (config/sizes.py, no torch) equals the built model's, by
role, for every preset and every injection, and for the layouts that change the shapes."""

import itertools

import pytest
import torch

from stabilitylab.config import INJECTIONS, PRESETS, ModelConfig, count_parameters
from stabilitylab.model import LoopedLM


def built_count(cfg: ModelConfig) -> tuple[int, int, int]:
    """(embedding, static, core) of a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = LoopedLM(cfg)
    embedding = model.wte.weight.numel() + sum(p.numel() for p in model.value_embeds.parameters())
    core = sum(p.numel() for p in model.core.parameters())
    return embedding, model.num_parameters() - embedding - core, core


def assert_counts_agree(cfg: ModelConfig) -> None:
    p = count_parameters(cfg)
    assert (p.embedding, p.static, p.core) == built_count(cfg)
    assert p.total == p.embedding + p.static + p.core


@pytest.mark.parametrize("preset, injection", list(itertools.product(PRESETS, INJECTIONS)))
def test_closed_form_count_matches_every_preset_and_injection(preset, injection):
    cfg = ModelConfig.preset(preset, injection=injection)
    if injection == "add" and cfg.state_dim != cfg.d_model:
        pytest.skip("add needs d_state == d_model")
    assert_counts_agree(cfg)


@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("layout", [
    dict(d_state=48, n_state_heads=2),  # a wider state than the residual
    dict(d_state=16, n_state_heads=2, d_state_mlp=40),  # narrower, with its own MLP width
    dict(n_kv_heads=2, n_heads=4, d_mlp=72),  # grouped-query attention outside the loop
    dict(tie_embeddings=False, prelude_norm=False),
    dict(value_embeds=False, n_prelude=2, n_core=3, n_coda=0),
    dict(value_embed_layers=(0, 1, 2)),
    dict(looped=False, n_kv_heads=2, n_heads=4),  # the GPT baseline
])
def test_closed_form_count_matches_layouts_that_change_shapes(injection, layout):
    if injection == "add" and "d_state" in layout:
        pytest.skip("add needs d_state == d_model")
    assert_counts_agree(ModelConfig(vocab_size=40, block_size=16, d_model=32, **{"n_heads": 2, **layout},
                                    injection=injection))
