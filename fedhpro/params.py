"""Declared keys: `param(default, help, choices, bounds)` for every `RunConfig` field and every method
hyperparameter, and the one checker (`check_value`) that validates a value against its declaration.

A neutral module importing nothing else of the package at import time, so that `fedhpro.config` and
`fedhpro.methods` both use it without an import cycle. The value's type comes from the field's annotation
(`bool`, `int`, `float`, `str`, `X | None` for a key that may be null, `Mapping[str, Any]`,
`tuple[str, ...]`); choices and bounds from the declaration; errors are one line naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from fedhpro.errors import ConfigError

# YAML 1.2 / JSON numbers: PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; a user writing
# `lr: 1e-3` (or valid JSON `1e-2`, or `--set lr=1e-3`) means the number.
FLOAT_RE = re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?$"
                       r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")  # YAML 1.2 core: no underscores

KINDS = ("bool", "int", "float", "str", "mapping", "str_list")


def param(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
          choices: tuple | Callable[[], tuple] | None = None, low: float | None = None,
          high: float | None = None, low_inclusive: bool = True, high_inclusive: bool = True,
          finite: bool = False) -> Any:
    """A declared key: its default (or `default_factory`), one line of help, and what values it accepts.

    `choices`: the accepted values (for a list of names: of each item), or a function returning them when
    they come from a registry imported late (methods, datasets, models). `low`/`high`: bounds, inclusive
    unless `low_inclusive`/`high_inclusive` is False. `finite`: refuse infinities (NaN is always refused)."""
    if not help:
        raise ValueError("param() needs a help text")
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help, "choices": choices, "low": low, "high": high,
                                       "low_inclusive": low_inclusive, "high_inclusive": high_inclusive,
                                       "finite": finite})


def declared_choices(f: dataclasses.Field) -> tuple | None:
    """The field's accepted values (a registry's names resolved now), or None when any value of its type goes."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def field_kind(annotation: Any) -> tuple[str, bool]:
    """(kind, nullable) of a field annotation (a real type, see `declared_fields`), kind one of `KINDS`."""
    nullable = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        if len(args) != 1:
            raise TypeError(f"unsupported declared type {annotation!r}")
        annotation = args[0]
    origin = typing.get_origin(annotation) or annotation
    simple = {bool: "bool", int: "int", float: "float", str: "str"}
    if origin in simple:
        return simple[origin], nullable
    if origin in (Mapping, dict):
        return "mapping", nullable
    if origin is tuple and typing.get_args(annotation) == (str, ...):
        return "str_list", nullable
    raise TypeError(f"unsupported declared type {annotation!r}")


@functools.cache
def declared_fields(cls: type) -> dict[str, tuple[dataclasses.Field, str, bool]]:
    """name -> (field, kind, nullable) of a dataclass whose fields are declared with `param` (cached: every
    config validation asks; do not modify the result)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, *field_kind(hints[f.name])) for f in dataclasses.fields(cls)}


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _number_text(bound: float) -> str:
    return "2**32" if bound == 2**32 else str(bound)


def _bounds_text(meta: Mapping[str, Any]) -> str:
    """The declared bounds in words: 'in [0, 1)', '> 0', '>= 1', '<= 5' ('' if none)."""
    low, high = meta.get("low"), meta.get("high")
    low_inclusive, high_inclusive = meta.get("low_inclusive", True), meta.get("high_inclusive", True)
    if low is not None and high is not None:
        return (f"in {'[' if low_inclusive else '('}{_number_text(low)}, {_number_text(high)}"
                f"{']' if high_inclusive else ')'}")
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {_number_text(low)}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {_number_text(high)}"
    return ""


def check_value(key: str, f: dataclasses.Field, kind: str, nullable: bool, value: Any, owner: str = "") -> Any:
    """`value` checked against the declaration of `key` (type, choices, bounds) and normalised (an int given for a
    float key becomes a float, a list of names a tuple); ConfigError naming the key otherwise. `owner` (a method
    name) is added after the key in messages."""
    label = f"config key {key!r}" + (f" ({owner})" if owner else "")
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{label} must not be null")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label} must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, str) and FLOAT_RE.match(value.strip()) and "_" not in value:
            value = float(value)  # `1e-3` read as a string by a YAML 1.1 parser (e.g. Snakemake's config loader)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ConfigError(f"{label} must be a number, got {value!r}")
        if f.metadata.get("finite") and not math.isfinite(value):
            raise ConfigError(f"{label} must be finite, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{label} must be a non-empty string, got {value!r}")
    elif kind == "mapping":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{label} must be a mapping of names to values, got {value!r}")
        value = dict(value)
    elif kind == "str_list":
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) and v for v in value):
            raise ConfigError(f"{label} must be a list of names, got {value!r}")
        value = tuple(value)
    choices = declared_choices(f)
    if choices:
        for item in value if kind == "str_list" else (value,):
            if item not in choices:
                raise ConfigError(f"{label}: unknown value {item!r}; accepted: {', '.join(map(str, choices))}")
    meta = f.metadata
    low, high = meta.get("low"), meta.get("high")
    low_ok = low is None or value > low or (value == low and meta.get("low_inclusive", True))
    high_ok = high is None or value < high or (value == high and meta.get("high_inclusive", True))
    if not (low_ok and high_ok):
        raise ConfigError(f"{label} must be {_bounds_text(meta)}, got {value!r}")
    return value


def describe_type(kind: str, nullable: bool) -> str:
    """A kind as `fedhpro config` prints it."""
    name = {"bool": "bool", "int": "int", "float": "float", "str": "str", "mapping": "mapping",
            "str_list": "list of names"}[kind]
    return f"{name} or null" if nullable else name


def describe_accepted(f: dataclasses.Field) -> str:
    """The accepted values of a declared key in words ('' if any value of its type goes)."""
    meta, parts = f.metadata, []
    choices = declared_choices(f)
    if choices:
        parts.append(f"one of {', '.join(map(str, choices))}")
    if _bounds_text(meta):
        parts.append(_bounds_text(meta))
    if meta.get("finite"):
        parts.append("finite")
    return "; ".join(parts)


def describe_declared(cls: type, indent: str = "") -> list[str]:
    """One line per declared key of `cls`: name, type, default, accepted values and help."""
    lines = []
    for name, (f, kind, nullable) in declared_fields(cls).items():
        accepted = describe_accepted(f)
        default = json.dumps(field_default(f))  # as written in a config file: null, true, [], "text"
        lines.append(f"{indent}{name} ({describe_type(kind, nullable)}{'; ' + accepted if accepted else ''}) = "
                     f"{default}: {f.metadata.get('help', '')}")
    return lines
