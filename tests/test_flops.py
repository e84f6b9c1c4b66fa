"""FLOP accounting: parameter counts match real models, the terms scale as documented."""

import pytest

import stabilitylab as sl
from stabilitylab.config import count_parameters, inference_flops_per_token, training_flops_per_token


@pytest.mark.parametrize("kw", [dict(), dict(looped=False), dict(d_state=32, n_state_heads=2, injection="concat"),
                                dict(tie_embeddings=False, n_core=2)])
def test_parameter_count_by_role_matches_the_built_model(kw):
    cfg = sl.ModelConfig(**{**dict(d_model=16, n_heads=2, vocab_size=32, block_size=16), **kw})
    model = sl.LoopedLM(cfg)
    p = count_parameters(cfg)
    assert p.embedding + p.static + p.core == model.num_parameters()
    assert p.core == sum(x.numel() for x in model.core.parameters())
    assert p.unrolled(3) == p.static + 3 * p.core


def test_training_flops_follow_the_documented_terms():
    cfg = sl.ModelConfig(mean_recurrence=8, backprop_depth=4)
    p, T = count_parameters(cfg), 256
    d = cfg.d_model
    f = training_flops_per_token(cfg, T, n=4, k=4, params=p)
    assert f.static == 6 * p.static + 12 * d * T * 2
    assert f.core_forward == (2 * p.core + 4 * d * T) * 8
    assert f.core_backward == (4 * p.core + 8 * d * T) * 4
    assert f.head == 6 * cfg.vocab_size * d
    no_head = training_flops_per_token(cfg, T, n=4, k=4, params=p, include_head=False)
    assert f.total - no_head.total == f.head


def test_gpt_flops_are_six_n_plus_attention():
    cfg = sl.ModelConfig(looped=False, n_prelude=2, n_core=2, n_coda=2)
    p, T = count_parameters(cfg), 128
    f = training_flops_per_token(cfg, T, include_head=False, params=p)
    assert f.total == 6 * (p.static + p.core) + 12 * cfg.d_model * T * 6


def test_a_looped_step_costs_more_than_inference_at_the_same_depth():
    cfg = sl.ModelConfig()
    assert training_flops_per_token(cfg, 128).total > 3 * inference_flops_per_token(cfg, 128) * 0.5
    assert inference_flops_per_token(cfg, 128, depth=8) > inference_flops_per_token(cfg, 128, depth=4)
