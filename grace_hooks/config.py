"""Typed method configs: dataclasses with defaults and ``help`` metadata; overrides checked."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from .errors import ConfigError

C = TypeVar("C")


def option(default: Any, help: str, choices: tuple | None = None) -> Any:  # noqa: A002 - mirrors argparse
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Turn CLI strings into the field's type (``int | None`` accepts 'none')."""
    if not isinstance(value, str):
        return value
    args = typing.get_args(hint) or (hint,)
    if type(None) in args and value.lower() in ("none", "null", ""):
        return None
    for t in args:
        if t is bool:
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
        elif t in (int, float):
            try:
                return t(value)
            except ValueError:
                continue
        elif t is str:
            return value
    raise ConfigError(f"config option {name!r}: cannot read {value!r} as {hint}")


def make_config(cls: type[C], overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> C:
    """Build ``cls`` from ``base`` (e.g. a stored pack config) then ``overrides``, with checks."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for source in (base or {}, overrides or {}):
        for key, value in source.items():
            if key not in fields:
                raise ConfigError(f"unknown option {key!r} for {cls.__name__}; options: {describe(cls)}")
            value = _coerce(key, value, hints[key])
            choices = fields[key].metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"option {key!r} must be one of {choices}, got {value!r}")
            values[key] = value
    return cls(**values)


def option_lines(cls: type) -> list[str]:
    """One ``name=default (help)`` line per option."""
    return [f"{f.name}={f.default!r} ({f.metadata.get('help', '')})" for f in dataclasses.fields(cls)]


def describe(cls: type) -> str:
    return "; ".join(option_lines(cls))
