"""One rule for every number of every config (config/base.py): finite, inside its declared
interval, an int within 64 bits, a float within float32; `inf` only where a bound says "no
bound". Checked as a property over every int and float field of every config dataclass (the
experiment's tables, the bounds file's, the warning rules), fed as TOML would."""

import dataclasses
import importlib
import inspect
import math
import pkgutil
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stabilitylab.config
from stabilitylab.analysis.bounds import Bounds, CheckSettings
from stabilitylab.analysis.events import WarningRules
from stabilitylab.config import (ConfigError, DataConfig, DivergenceConfig, ModelConfig, ProbeConfig, SweepConfig,
                                 TrainConfig, from_dict, numeric_fields)
from stabilitylab.config.base import FLOAT32_MAX, INT64_MAX

CONFIGS = (ModelConfig, DataConfig, TrainConfig, ProbeConfig, DivergenceConfig, SweepConfig,  # experiment tables
           Bounds, CheckSettings,  # a bounds file (stabilitylab check)
           WarningRules)  # stabilitylab events' thresholds
FIELDS = [(cls, name) for cls in CONFIGS for name in numeric_fields(cls)]
HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, -1.0, -1e300, 1e308, 1e39, -3.5e38, FLOAT32_MAX, 0.0, 5e-324]
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
    if isinstance(x, float) and abs(x) > FLOAT32_MAX:
        return False
    return interval is None or x in interval


def test_every_numeric_field_is_covered():
    assert len(FIELDS) > 50  # all of ModelConfig's, TrainConfig's, ... int and float fields
    assert ("TrainConfig", "lr") in [(c.__name__, n) for c, n in FIELDS]
    in_config = {cls for info in pkgutil.iter_modules(stabilitylab.config.__path__)
                 for _, cls in inspect.getmembers(importlib.import_module(f"stabilitylab.config.{info.name}"))
                 if dataclasses.is_dataclass(cls) and isinstance(cls, type) and cls.__name__.endswith("Config")
                 and numeric_fields(cls)}  # ExperimentConfig holds only the others
    assert in_config <= set(CONFIGS), f"config dataclasses the property does not cover: {in_config - set(CONFIGS)}"


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
    (ModelConfig, "d_model", 2**70), (TrainConfig, "lr", 1e300), (TrainConfig, "eps", 1e39),
    (DivergenceConfig, "max_loss", -math.inf), (WarningRules, "patience", 0), (WarningRules, "rho", math.nan),
    (Bounds, "max_jacobian_radius", -1.0), (CheckSettings, "growth_multiple", 1),
])
def test_known_bad_numbers_are_refused_with_the_field_and_the_fix(cls, name, value):
    with pytest.raises(ConfigError, match=rf"^exp\.toml: s\.{name}: .*\. Set s\.{name} to"):
        from_dict(cls, {name: value}, source="exp.toml", section="s")


def test_an_infinite_bound_means_no_bound():
    assert DivergenceConfig(max_loss=math.inf, max_state_norm=math.inf).max_loss == math.inf


@pytest.mark.parametrize("fields, says", [
    (dict(lr=1e38), r"lr / \(1 − betas\[0\]\) = 5e\+38 overflows float32"),  # AdamW's first step: lr / 0.2
    (dict(lr=1e30, weight_decay=1e10), r"lr · weight_decay = 1e\+40 overflows float32"),
])
def test_a_learning_rate_whose_first_optimiser_step_overflows_float32_is_refused(fields, says):
    """A finite lr below float32's max can still overflow in AdamW's first step (a RuntimeError
    from torch, after the model was built): refused up front."""
    with pytest.raises(ConfigError, match=says):
        TrainConfig(**fields)
    assert TrainConfig(lr=1e30).lr == 1e30  # huge but representable: the run diverges, a result
