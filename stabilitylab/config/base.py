"""The rules every config follows: errors that name the fix, TOML in, one range rule for numbers.

Every config is a plain dataclass. `from_dict` builds one from a TOML table and turns every
mistake (an unknown field, a wrong type, a value outside the allowed set) into a
`ConfigError` that names the file, the field, the allowed values and the fix.

Numbers obey one rule, written once (`check_numbers`): every int and float field (and every
number inside a tuple field) is finite and inside its declared interval. A field declares
its interval where it is defined,

    lr: float = number(3e-3, "(0, inf)")      # peak learning rate

and a field that declares none is still checked: finite, an int fits in 64 bits (what
SQLite and torch can hold) and a float in float32 (|x| ≤ 3.4e38: the tensors and optimiser
state it configures are float32, where a larger number is inf). `inf` is allowed only where
the interval closes on it, "(0, inf]" ("no bound"). NaN never passes: it compares false with
everything, so a NaN bound would silently disable the rule it configures. Rules that span
fields (warmup_steps < steps) stay with their dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INT64_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32


class ConfigError(ValueError):
    """A bad configuration value. The message names the field, the source and the fix."""

    def __init__(self, field: str, problem: str, fix: str = "", source: str | Path | None = None):
        self.field, self.problem, self.fix, self.source = field, problem, fix, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {problem}" + (f". {fix}" if fix else ""))

    def located(self, source: str | Path | None, section: str = "") -> "ConfigError":
        """The same error, with the file and the TOML section it came from."""
        name = f"{section}.{self.field}" if section and not self.field.startswith(section + ".") else self.field
        fix = self.fix.replace(f"Set {self.field} ", f"Set {name} ")  # the fix names the field as the message does
        return ConfigError(name, self.problem, fix, source or self.source)


def read_toml(path: str | Path, field: str, example: str) -> dict[str, Any]:
    """The tables of a TOML file. A missing, unreadable or malformed file raises a ConfigError
    that names the file and what to pass instead (e.g. `example`)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(field, f"{path} does not exist", f"Pass a TOML file, e.g. {example}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(field, f"cannot read {path} ({err})", "Pass a readable TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("syntax", f"not valid TOML: {err}", "Fix the line it names", source=path) from None


def check_choice(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    """Raise a ConfigError unless `value` is one of `allowed` (with a did-you-mean)."""
    allowed = list(allowed)
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(name, f"{value!r} is not allowed", f"{hint}Allowed: {', '.join(map(str, allowed))}")


def check_positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    """For derived values (a field's own range is declared with `number`)."""
    if not value >= 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ConfigError(name, f"must be {bound}, got {value!r}", f"Set {name} to a value {bound}")


# ---- the one rule for numbers -------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """An interval written as text: "(0, inf)", "[0, 1)", "(0, inf]" (inf allowed)."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        low, high = (part.strip() for part in text[1:-1].split(","))
        return cls(float(low), float(high), text[0] == "[", text[-1] == "]", text)

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    def describe(self) -> str:
        """"be > 0", "be ≥ 0" for a half line; "lie in [0, 1)" otherwise: what a value must do."""
        if self.high == math.inf and not self.high_closed:
            return f"be {'≥' if self.low_closed else '>'} {self.low:g}"
        return f"lie in {self.text}"


def number(default: Any, interval: str) -> Any:
    """A numeric dataclass field with its allowed interval (module docstring)."""
    return dataclasses.field(default=default, metadata={"interval": Interval.parse(interval)})


def numeric_fields(cls: type) -> dict[str, Interval | None]:
    """The numeric fields of a config dataclass (ints, floats and tuples of them, optional or
    not), each with its declared interval or None."""
    hints = typing.get_type_hints(cls)
    return {f.name: f.metadata.get("interval") for f in dataclasses.fields(cls) if _is_numeric(hints[f.name])}


def check_numbers(config: Any) -> None:
    """The rule of the module docstring, on every numeric field of a config dataclass."""
    for name, interval in numeric_fields(type(config)).items():
        value = getattr(config, name)
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue  # None, or a non-number inside a mixed tuple (eval_depths' "mu")
            _check_number(name, x, interval)


def _check_number(name: str, x: int | float, interval: Interval | None) -> None:
    if isinstance(x, float) and math.isnan(x):
        raise ConfigError(name, "is NaN", _fix(name, interval))
    if math.isinf(x) and not (interval and x == interval.high and interval.high_closed):
        raise ConfigError(name, f"is {x}", _fix(name, interval))
    if isinstance(x, int) and abs(x) > INT64_MAX:
        raise ConfigError(name, f"{x} does not fit in 64 bits", f"Set {name} to a value below 2^63")
    if isinstance(x, float) and math.isfinite(x) and abs(x) > FLOAT32_MAX:
        raise ConfigError(name, f"{x:g} is beyond float32's range (±3.4e38)", _fix(name, interval))
    if interval and x not in interval:
        raise ConfigError(name, f"must {interval.describe()}, got {x!r}", _fix(name, interval))


def _fix(name: str, interval: Interval | None) -> str:
    if interval is None:
        return f"Set {name} to a finite number"
    must = interval.describe()
    inf = " (inf for no bound)" if interval.high_closed and interval.high == math.inf else ""
    return f"Set {name} to a number that must {must}{inf}".replace("must be", "is").replace("must lie", "lies")


def _is_numeric(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list):
        return any(_is_numeric(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return annotation in (int, float)


# ---- building dataclasses from TOML tables --------------------------------------------

def _type_ok(value: Any, annotation: Any) -> bool:
    """Does a TOML value fit a dataclass field annotation (ints are accepted as floats)?"""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation)


def from_dict(cls: type, data: dict[str, Any], source: str | Path | None = None, section: str = ""):
    """Build dataclass `cls` from a mapping; every error names the file, field and fix."""
    if not isinstance(data, dict):
        raise ConfigError(section or cls.__name__, f"expected a table, got {type(data).__name__}",
                          source=source)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(key, "unknown field", f"{hint}Known fields: {', '.join(sorted(fields))}"
                              ).located(source, section)
        if not _type_ok(value, hints[key]):
            raise ConfigError(key, f"{value!r} has the wrong type",
                              f"Expected {_type_name(hints[key])}").located(source, section)
    try:
        return cls(**data)
    except ConfigError as err:
        raise err.located(source, section) from None


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
