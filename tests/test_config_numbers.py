"""One rule for every number of every config (config/base.py): finite, inside its declared
interval, an int within 64 bits; `inf` only where a bound says "no bound". Checked as a
property over every int and float field of every config dataclass, fed as TOML would."""

import math
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stabilitylab.config import (ConfigError, DataConfig, DivergenceConfig, ModelConfig, ProbeConfig, SweepConfig,
                                 TrainConfig, from_dict, numeric_fields)
from stabilitylab.config.base import INT64_MAX

CONFIGS = (ModelConfig, DataConfig, TrainConfig, ProbeConfig, DivergenceConfig, SweepConfig)
FIELDS = [(cls, name) for cls in CONFIGS for name in numeric_fields(cls)]
HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, -1.0, -1e300, 1e308, 0.0, 5e-324]
HOSTILE_INTS = [-1, -(2**70), 2**70, INT64_MAX + 1, 0]


def kinds(cls: type, name: str) -> set[type]:
    """The number types a field holds (int, float), looking through Optional and tuples."""
    def walk(a):
        if a in (int, float):
            return {a}
        return set().union(*(walk(x) for x in typing.get_args(a) if x is not Ellipsis), set())
    return walk(typing.get_type_hints(cls)[name])


def values_for(cls: type, name: str):
    numbers = st.sampled_from(HOSTILE_INTS) | st.integers(-10, 10**6) if int in kinds(cls, name) and \
        float not in kinds(cls, name) else st.sampled_from(HOSTILE_FLOATS) | st.floats(allow_nan=True)
    if name in ("betas",):
        return st.tuples(numbers, numbers).map(list)
    if name == "seeds":
        return st.lists(numbers, min_size=1, max_size=3, unique=True)
    return numbers


def acceptable(x: int | float, interval) -> bool:
    """The rule, written out independently of config/base.py."""
    if isinstance(x, float) and math.isnan(x):
        return False
    if math.isinf(x):
        return bool(interval) and x == interval.high and interval.high_closed
    if isinstance(x, int) and abs(x) > INT64_MAX:
        return False
    return interval is None or x in interval


def test_every_numeric_field_is_covered():
    assert len(FIELDS) > 40  # all of ModelConfig's, TrainConfig's, ... int and float fields
    assert ("TrainConfig", "lr") in [(c.__name__, n) for c, n in FIELDS]


@pytest.mark.parametrize("cls, name", FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FIELDS])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_config_accepts_a_number_only_if_it_is_finite_and_in_range(cls, name, data):
    value = data.draw(values_for(cls, name))
    interval = numeric_fields(cls)[name]
    xs = value if isinstance(value, list) else [value]
    allowed = all(acceptable(x, numeric_fields(cls)[name]) for x in xs)
    try:
        cfg = from_dict(cls, {name: value}, source="exp.toml", section="s")
    except ConfigError as err:
        if not allowed:
            assert f"s.{name}" in str(err) and str(err).startswith("exp.toml: ")  # it names file and field
        return  # an allowed value may still break a rule that spans fields (warmup_steps < steps)
    assert allowed, f"{cls.__name__}.{name} = {value!r} was accepted"
    held = getattr(cfg, name)
    for x in held if isinstance(held, tuple) else (held,):
        assert not math.isnan(x)


@pytest.mark.parametrize("cls, name, value", [
    (TrainConfig, "lr", math.inf), (TrainConfig, "lr", math.nan), (TrainConfig, "lr", -1e-3),
    (TrainConfig, "betas", [0.9, math.nan]), (DivergenceConfig, "spike_k", math.inf),
    (ModelConfig, "injection_decay", 1.0), (ModelConfig, "rope_base", math.nan), (DataConfig, "val_fraction", 0.0),
    (ModelConfig, "d_model", 2**70),
])
def test_known_bad_numbers_are_refused_with_the_field_and_the_fix(cls, name, value):
    with pytest.raises(ConfigError, match=rf"^exp\.toml: s\.{name}: .*\. Set {name} to"):
        from_dict(cls, {name: value}, source="exp.toml", section="s")


def test_an_infinite_bound_means_no_bound():
    assert DivergenceConfig(max_loss=math.inf, max_state_norm=math.inf).max_loss == math.inf
