"""Configs: defaults are valid, presets match the released models, errors name field and fix."""

import pytest

import stabilitylab as sl
from stabilitylab.config import ConfigError, count_parameters, from_dict


def test_defaults_are_the_small_cpu_setting():
    cfg = sl.ModelConfig()
    assert (cfg.d_model, cfg.n_heads, cfg.n_prelude, cfg.n_core, cfg.n_coda) == (128, 4, 1, 1, 1)
    assert cfg.injection == "parcae" and cfg.mu_bwd == 2


def test_parcae_140m_preset_has_the_released_models_parameter_count():
    # the authors' parcae-small-140m (parcae_lm.create_model) has 144,323,136 parameters
    p = count_parameters(sl.ModelConfig.preset("parcae-140m"))
    assert p.embedding + p.static + p.core == 144_323_136


def test_gpt_presets_are_the_same_blocks_without_a_loop():
    gpt, parcae = sl.ModelConfig.preset("gpt-370m"), sl.ModelConfig.preset("parcae-370m")
    assert not gpt.looped and parcae.looped
    assert gpt.n_effective_layers == parcae.n_effective_layers == 12


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(injection="parcae2"), "injection", "parcae-zoh"),
    (dict(d_model=130, n_heads=4), "n_heads", "divisors"),
    (dict(mean_recurrence=-2), "mean_recurrence", "> 0"),
    (dict(backprop_depth=-1), "backprop_depth", "≥ 0"),
    (dict(depth_granularity="sample"), "depth_granularity", "sequence"),
    (dict(injection="add", d_state=64), "injection", "d_state"),
])
def test_bad_values_name_the_field_and_what_is_allowed(kwargs, field, allowed):
    with pytest.raises(ConfigError) as err:
        sl.ModelConfig(**kwargs)
    assert err.value.field == field and allowed in str(err.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="parcae-140m"):
        sl.ModelConfig.preset("parcae-100m")


def test_toml_tables_give_errors_that_name_file_section_and_field():
    with pytest.raises(ConfigError, match=r"exp\.toml: model\.injektion: unknown field\. did you mean 'injection'"):
        from_dict(sl.ModelConfig, {"injektion": "add"}, source="exp.toml", section="model")
    with pytest.raises(ConfigError, match=r"exp\.toml: model\.d_model: '128' has the wrong type"):
        from_dict(sl.ModelConfig, {"d_model": "128"}, source="exp.toml", section="model")
    with pytest.raises(ConfigError, match=r"exp\.toml: model\.injection: 'nope' is not allowed"):
        from_dict(sl.ModelConfig, {"injection": "nope"}, source="exp.toml", section="model")
    cfg = from_dict(sl.ModelConfig, {"d_model": 64, "init_std": 1, "value_embed_layers": [0]})
    assert cfg.d_model == 64 and cfg.value_embed_layers == (0,)
